"""ConceptEdit: edit what a text-to-image diffusion model knows, inside ComfyUI.

The methods erase, redirect or debias a concept: ConceptPrune, UCE closed-form cross-attention
edits with RECE hardening, EMCID text-encoder edits, RGD / gradient-ascent / ESD unlearning, and
bilevel distill-and-unlearn for pruned students. The audits check that it stays erased (resurgence
under benign fine-tuning, a red team of prompt attacks and mask revival, a classifier-free presence
score), and the erasure benchmark measures it on prompt lists. They run on SD1.x/SD2.x/SDXL and other
SD-style UNets, SD3, Flux.1/Flux.2, Chroma, Qwen-Image, Z-Image, Lumina 2, HiDream, Wan, PixArt,
HunyuanImage and AuraFlow, also in fp8; an edit is a small file that exports as a standard LoRA. The
library (`editing/`) is pure torch; docs/methods.md explains each method.

Inside ComfyUI the pack is a V3 extension: ``comfy_entrypoint`` returns it. It deliberately has no
NODE_CLASS_MAPPINGS there, since ComfyUI's loader takes the V1 path whenever a module has one. On a
ComfyUI older than the V3 API it needs it logs one message and registers nothing (an empty
NODE_CLASS_MAPPINGS keeps the old loader quiet). Imported anywhere else (tests, the command line,
A1111), it registers nothing and fails nothing: the nodes load only when ComfyUI itself is already
imported.
"""
import logging
import sys

# the first ComfyUI release the pack is tested on (pyproject.toml's requires-comfyui says why)
MIN_COMFYUI = "0.3.75"
WEB_DIRECTORY = "./web"
# what the nodes use of ComfyUI's V3 API (comfy_api.latest)
_V3_NEEDS = {"io": ("ComfyNode", "Schema", "NodeOutput", "Custom", "Combo", "Int", "Float", "String", "Boolean",
                    "Model", "Clip", "Vae", "ClipVision", "Image"),
             "ui": ("PreviewText", "PreviewImage")}


def _register_tiny_world() -> None:
    """The bundled tiny world (pure python) for the library's `tiny` preset and evaluation; its
    classifier loads (with torch) only when asked for. A stripped install without tiny/ skips it."""
    try:
        from .editing import worlds
        from .tiny import world
    except ImportError:
        return

    def load_classifier():
        from .tiny.classifier import load_classifier as load
        return load()

    worlds.register("tiny", world, load_classifier)


def _missing_v3_api() -> str | None:
    """What this ComfyUI lacks of the V3 node API the pack uses, or None when it has all of it."""
    import importlib
    try:
        latest = importlib.import_module("comfy_api.latest")
    except ImportError as e:
        return f"no comfy_api.latest ({e})"
    gone = [f"{mod}.{name}" for mod, names in _V3_NEEDS.items() for name in names
            if not hasattr(getattr(latest, mod, None), name)]
    if not hasattr(latest, "ComfyExtension"):
        gone.append("ComfyExtension")
    return f"comfy_api.latest has no {', '.join(gone)}" if gone else None


_register_tiny_world()

if "comfy.model_patcher" in sys.modules or "comfy.model_management" in sys.modules:
    _missing = _missing_v3_api()
    if _missing is None:
        from .nodes import comfy_entrypoint
        __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
    else:
        logging.getLogger(__name__).warning(
            "ConceptEdit needs ComfyUI >= %s; update ComfyUI (git pull, or ComfyUI-Manager: Update ComfyUI) and "
            "restart. This one lacks the V3 node API the pack is written in (%s), so no ConceptEdit node was "
            "registered.", MIN_COMFYUI, _missing)
        NODE_CLASS_MAPPINGS: dict = {}
        NODE_DISPLAY_NAME_MAPPINGS: dict = {}
        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
