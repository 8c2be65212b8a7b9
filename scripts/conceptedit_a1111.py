"""ConceptEdit for Automatic1111 (and Forge builds that keep A1111's model tree).

Adds an always-visible "ConceptEdit" panel under txt2img/img2img: pick an edit file from
``models/concept_edits`` and a strength; the edit's weight changes are added to the loaded model
when a generation starts (`process`) and the original weights are written back when it ends
(`postprocess`), so nothing stays changed between generations.

The least fragile route in A1111 needs no script at all: export the edit as a LoRA (ComfyUI's
"Export Edit as LoRA" node or ``conceptedit.py export-lora``), put the file in ``models/Lora`` and
write ``<lora:name:1>`` in the prompt. This script is for edit files themselves (pruning masks
included) without exporting.

Every A1111 import is guarded: outside A1111 the file imports and does nothing (tests use the
weight logic on a fake model tree). Only the pack's ``editing`` library is used.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import types

import torch

log = logging.getLogger("conceptedit.a1111")

try:  # A1111 / Forge only
    import gradio as gr
    import modules.scripts as scripts
    from modules import paths, shared
    IN_A1111 = True
except ImportError:
    gr = scripts = paths = shared = None
    IN_A1111 = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "conceptedit"


def _library():
    """The pack's `editing` library under a unique package name (A1111 puts many extensions on
    sys.path, so a bare ``import editing`` could find another one's). The repository's own
    __init__.py is not run: it is ComfyUI's entry point."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is None or os.path.realpath(list(getattr(pkg, "__path__", [""]))[0]) != os.path.realpath(ROOT):
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [ROOT]
        sys.modules[PACKAGE] = pkg
    arch = importlib.import_module(f"{PACKAGE}.editing.arch")
    edit = importlib.import_module(f"{PACKAGE}.editing.edit")
    apply = importlib.import_module(f"{PACKAGE}.editing.export.diffusers")
    return arch, edit, apply


# ---- names: ComfyUI patch keys -> A1111's LDM model tree ---------------------------------------------
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight$")


def a1111_name(family, key: str) -> str:
    """The parameter name inside ``shared.sd_model`` for a ComfyUI key: the UNet lives at
    ``model.diffusion_model``; CLIP-L under the checkpoint prefix with HF names; OpenCLIP (SD2's
    CLIP-H, SDXL's CLIP-G) with its own names (``transformer.resblocks.N.mlp.c_proj``)."""
    if key.startswith("diffusion_model."):
        return "model." + key
    for te in family.text_encoders:
        head = f"{te.name}.transformer."
        if not key.startswith(head):
            continue
        rest = key[len(head):]
        if te.a1111.endswith(".transformer."):  # HF CLIPTextModel inside A1111's FrozenCLIPEmbedder
            return te.a1111 + rest
        m = _HF_LAYER.match(rest)
        if m is None:
            raise KeyError(f"{key}: only the text encoder's MLP layers can be edited in an OpenCLIP encoder from A1111")
        return f"{te.a1111}transformer.resblocks.{m.group(1)}.mlp.{'c_proj' if m.group(2) == 'fc2' else 'c_fc'}.weight"
    raise KeyError(f"{key} is not in the {family.label} table")


def detect_model_family(sd_model):
    """The family of A1111's loaded model, from its UNet's key names and shapes."""
    arch, _, _ = _library()
    unet = sd_model.model.diffusion_model
    return arch.detect_family({k: tuple(v.shape) for k, v in unet.state_dict().items()})


def apply_edit_to_sd_model(sd_model, edit, strength: float = 1.0):
    """Add the edit to the live weights of an A1111 model; returns a handle with ``undo()``.
    Checks family, keys and shapes first (a wrong edit changes nothing)."""
    _, _, apply = _library()
    family = detect_model_family(sd_model)
    if edit.family != family.name:
        arch, _, _ = _library()
        raise ValueError(f"this {edit.method} edit was made for {arch.get_family(edit.family).label}; the loaded "
                         f"model is {family.label}")
    targets = {}
    for key in edit.changes:
        name = a1111_name(family, key)
        try:
            targets[key] = (name, sd_model.get_parameter(name))
        except AttributeError:
            raise ValueError(f"the edit changes {name}, which the loaded model does not have") from None
    return apply.apply_to_parameters(edit, targets, strength)


def edits_dir() -> str:
    base = getattr(paths, "models_path", None) if paths is not None else None
    return os.path.join(base or os.path.join(ROOT, "models"), "concept_edits")


def list_edit_files() -> list[str]:
    folder = edits_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


if IN_A1111:
    class ConceptEditScript(scripts.Script):
        def __init__(self):
            super().__init__()
            self.handle = None
            self._cache: dict = {}

        def title(self):
            return "ConceptEdit"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            with gr.Accordion("ConceptEdit", open=False):
                enabled = gr.Checkbox(label="Apply a concept edit", value=False)
                edit_file = gr.Dropdown(label=f"Edit file ({edits_dir()})", choices=list_edit_files())
                refresh = gr.Button("Refresh list")
                strength = gr.Slider(label="Strength (0 = original model, 1 = the edit)", minimum=-2.0, maximum=2.0,
                                     value=1.0, step=0.05)
                refresh.click(lambda: gr.update(choices=list_edit_files()), outputs=[edit_file])
            return [enabled, edit_file, strength]

        def _load(self, name: str):
            _, edit_mod, _ = _library()
            path = os.path.join(edits_dir(), name)
            stamp = (path, os.path.getmtime(path))
            if stamp not in self._cache:
                self._cache = {stamp: edit_mod.Edit.load(path)}
            return self._cache[stamp]

        def process(self, p, enabled, edit_file, strength):
            self._restore()
            if not enabled or not edit_file:
                return
            edit = self._load(edit_file)
            self.handle = apply_edit_to_sd_model(shared.sd_model, edit, float(strength))
            p.extra_generation_params["ConceptEdit"] = f"{edit_file}:{strength}"
            log.info("ConceptEdit: %s applied (%d weights)", edit_file, len(self.handle.keys))

        def postprocess(self, p, processed, *args):
            self._restore()

        def _restore(self):
            if self.handle is not None:
                self.handle.undo()
                self.handle = None
