"""Nodes shared by every method: save, load and apply an EDIT."""
from __future__ import annotations

import json
import os

from ..comfy_host.adapters import apply_edit
from ..editing.edit import Edit
from .common import CATEGORY, EDIT, edit_path, edits_dir, list_edits, strength_input, unique_path


class SaveEdit:
    DESCRIPTION = "Save an edit (mask or weight change, with its metadata) as a .safetensors file in models/concept_edits."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "edit": (EDIT, {"tooltip": "The edit to save (from any ConceptEdit method node)."}),
            "filename": ("STRING", {"default": "concept_edit", "tooltip": "File name (no extension); an existing file is not overwritten, a number is added."}),
        }}

    def execute(self, edit: Edit, filename: str):
        path = save_edit_file(edit, filename)
        return {"ui": {"text": [f"saved {os.path.basename(path)}"]}}


def save_edit_file(edit: Edit, filename: str) -> str:
    path = unique_path(edits_dir(), filename, "concept_edit")
    return edit.save(path)


class LoadEdit:
    DESCRIPTION = "Load an edit file from models/concept_edits (safetensors only; nothing is unpickled)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EDIT, "STRING")
    RETURN_NAMES = ("edit", "info")
    OUTPUT_TOOLTIPS = ("The loaded edit.", "Method, concepts, parameters and metrics stored with it.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"edit_name": (list_edits(), {"tooltip": "An edit file in models/concept_edits."})}}

    def execute(self, edit_name: str):
        edit = Edit.load(edit_path(edit_name))
        info = {k: v for k, v in edit.summary().items() if k != "keys"}
        return (edit, json.dumps(info, indent=1, default=str))


class ApplyEdit:
    DESCRIPTION = ("Apply an edit to a model as patches on a copy: the input MODEL/CLIP stay unchanged. "
                   "Checks that the edit was made for this model family before applying anything.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "warnings")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to edit (it is cloned, never changed)."}),
            "edit": (EDIT, {"tooltip": "An edit from a method node or Load Edit."}),
            "strength": strength_input(),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Needed when the edit changes the text encoder."}),
        }}

    def execute(self, model, edit: Edit, strength: float, clip=None):
        m, c, warnings = apply_edit(model, clip, edit, strength)
        return (m, c, "\n".join(warnings))


NODE_CLASS_MAPPINGS = {
    "ConceptEditSaveEdit": SaveEdit,
    "ConceptEditLoadEdit": LoadEdit,
    "ConceptEditApplyEdit": ApplyEdit,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEditSaveEdit": "Save Concept Edit",
    "ConceptEditLoadEdit": "Load Concept Edit",
    "ConceptEditApplyEdit": "Apply Concept Edit",
}
