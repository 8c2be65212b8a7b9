"""Nodes shared by every method: save, load and apply an EDIT."""
from __future__ import annotations

import json
import os

from comfy_api.latest import io, ui

from ..comfy_host.view import apply_edit
from ..editing.edit import Edit
from .common import EDIT, edit_path, edits_dir, list_edits, node_schema, output, strength_input, unique_path

FILE_ALIASES = ("concept edit file", "erase", "unlearn")


class SaveEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditSaveEdit", "Save Concept Edit",
            "Save an edit (mask or weight change, with its metadata) as a .safetensors file in models/concept_edits.",
            inputs=[EDIT.Input("edit", tooltip="The edit to save (from any ConceptEdit method node)."),
                    io.String.Input("filename", default="concept_edit", tooltip="File name (no extension); an "
                                    "existing file is not overwritten, a number is added.")],
            aliases=("save edit", *FILE_ALIASES), output_node=True)

    @classmethod
    def execute(cls, edit: Edit, filename: str):
        path = save_edit_file(edit, filename)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.basename(path)}"))


def save_edit_file(edit: Edit, filename: str) -> str:
    path = unique_path(edits_dir(), filename, "concept_edit")
    return edit.save(path)


class LoadEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditLoadEdit", "Load Concept Edit",
            "Load an edit file from models/concept_edits (safetensors only; nothing is unpickled).",
            inputs=[io.Combo.Input("edit_name", options=list_edits(), tooltip="An edit file in models/concept_edits.")],
            outputs=[output(EDIT, "edit", "The loaded edit."),
                     output(io.String, "info", "Method, concepts, parameters and metrics stored with it.")],
            aliases=("load edit", *FILE_ALIASES))

    @classmethod
    def validate_inputs(cls, edit_name=None):
        if edit_name is not None and edit_name not in list_edits():
            return (f"no edit named {edit_name!r} in models/concept_edits: put the file there and refresh the node "
                    "(R), or pick one from the list")
        return True

    @classmethod
    def execute(cls, edit_name: str):
        edit = Edit.load(edit_path(edit_name))
        info = {k: v for k, v in edit.summary().items() if k != "keys"}
        return io.NodeOutput(edit, json.dumps(info, indent=1, default=str))


class ApplyEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditApplyEdit", "Apply Concept Edit",
            "Apply an edit to a model as patches on a copy: the input MODEL/CLIP stay unchanged. "
            "Checks that the edit was made for this model family before applying anything.",
            inputs=[io.Model.Input("model", tooltip="The model to edit (it is cloned, never changed)."),
                    EDIT.Input("edit", tooltip="An edit from a method node or Load Edit."),
                    strength_input(),
                    io.Clip.Input("clip", optional=True, tooltip="Needed when the edit changes the text encoder.")],
            outputs=[output(io.Model, "model"), output(io.Clip, "clip"), output(io.String, "warnings")],
            aliases=("apply edit", "lora", *FILE_ALIASES))

    @classmethod
    def execute(cls, model, edit: Edit, strength: float, clip=None):
        m, c, warnings = apply_edit(model, clip, edit, strength)
        return io.NodeOutput(m, c, "\n".join(warnings))


NODES = [SaveEdit, LoadEdit, ApplyEdit]
