"""Test-only ComfyUI nodes, loaded by the server that tests/test_workflow_runs.py starts (never
shipped with the pack): the bundled tiny model as a checkpoint loader with CheckpointLoaderSimple's
outputs, so an example workflow runs on it with its links unchanged."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import folder_paths  # noqa: E402

# ComfyUI writes LoRAs to its first loras folder, inside its own install: point it at the test's
_dirs = json.loads(os.environ.get("CONCEPTEDIT_TEST_DIRS", "{}"))
if "loras" in _dirs:
    folder_paths.folder_names_and_paths["loras"][0].insert(0, _dirs["loras"])


class TinyCheckpoint:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"})}}

    def load(self, ckpt_name):
        import _pack
        _pack.load("_conceptedit_test_tiny")
        if ckpt_name == "tiny-flux":
            from _conceptedit_test_tiny.tiny.flux import load_tiny_flux
            return load_tiny_flux()
        from _conceptedit_test_tiny.tiny.comfy_model import load_tiny
        return load_tiny()


NODE_CLASS_MAPPINGS = {"ConceptEditTestTinyCheckpoint": TinyCheckpoint}
