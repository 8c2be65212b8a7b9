"""What every node module shares: the EDIT socket type, the V3 input helpers, the schema builder,
the pre-run checks, the edits folder."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from comfy_api.latest import io

from ..editing.errors import ConceptEditError

EDIT = io.Custom("CONCEPT_EDIT")   # socket type carrying an editing.Edit
CATEGORY = "ConceptEdit"
EDITS_FOLDER = "concept_edits"  # models/concept_edits, listed in the Load Edit dropdown
# appended to every guidance-scale tooltip: the pack samples guidance-distilled models at CFG 1
# (editing.diffusion.sampling_cfg), and flow models draw best well below SD's 7.5
CFG_NOTE = (" Flux-dev (guidance-distilled) is always sampled at CFG 1, its guidance embedding at 3.5; "
            "other flow models want less than SD (SD3 about 4.5, Flux-schnell 1).")
# Schema fields of the host's V3 API: newer ComfyUI has `search_aliases`, 0.3.75 has not (there the
# aliases are left out and the node search reads names, categories and descriptions only)
_SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(io.Schema))


def node_schema(node_id: str, display_name: str, description: str, inputs: Sequence[io.Input],
                outputs: Sequence[io.Output] = (), aliases: Sequence[str] = (), output_node: bool = False) -> io.Schema:
    """The io.Schema of a ConceptEdit node. An output named like an input (a node that takes and
    returns a `model`) gets the id ``<name>_out``: ComfyUI 0.3.75 refuses ids shared between inputs
    and outputs, and links and saved workflows address outputs by position and display name only."""
    taken = {i.id for i in inputs}
    for o in outputs:
        if o.id in taken:
            o.id = f"{o.id}_out"
    extra = {"search_aliases": list(aliases)} if aliases and "search_aliases" in _SCHEMA_FIELDS else {}
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=list(inputs), outputs=list(outputs), is_output_node=output_node, **extra)


def output(kind, name: str, tooltip: str | None = None) -> io.Output:
    """An output socket shown as `name` (its V1 RETURN_NAME)."""
    return kind.Output(id=name, display_name=name, tooltip=tooltip)


# ---- input helpers ---------------------------------------------------------------------------------
def strength_input(default: float = 1.0, optional: bool = False) -> io.Float.Input:
    return io.Float.Input("strength", default=default, min=-4.0, max=4.0, step=0.05, optional=optional,
                          tooltip="How much of the edit to apply: 0 is exactly the original model, 1 the edit.")


def audited_inputs() -> list[io.Input]:
    """What every audit node compares: the edited and the original MODEL, and the original's CLIP."""
    return [io.Model.Input("edited_model", tooltip="The model after the edit (e.g. from a ConceptEdit method node)."),
            io.Model.Input("original_model", tooltip="The model before the edit."),
            io.Clip.Input("clip", tooltip="The original model's text encoder.")]


def concept_prompts_input() -> io.String.Input:
    return io.String.Input("concept_prompts", multiline=True, default="",
                           tooltip="Prompts that show the erased concept (one per line).")


def size_inputs(what: str) -> list[io.Int.Input]:
    """Optional width/height of the pictures a node generates; 0 = the model's native size."""
    tip = (f"Width/height in pixels of the pictures {what} (multiples of 8); 0 = the model's native size "
           "(SD1.x 512, SD2.x 768, SDXL, SDXL-conditioned layouts, Flux, SD3 and most DiTs 1024, "
           "HunyuanImage 2.1 2048, Wan 2.1 512, the tiny models their own).")
    return [io.Int.Input(name, default=0, min=0, max=8192, step=8, optional=True, tooltip=tip)
            for name in ("width", "height")]


# ---- checks before the run (validate_inputs) ---------------------------------------------------
def widget_problems(cls, values: dict) -> list[str]:
    """The given widget values checked against `cls`'s schema: numbers within min/max, choices among
    the options. ComfyUI skips its own range check for every input a validate_inputs names, and
    0.3.75 checks no V3 choice at all. A value None came through a link and is checked when it runs."""
    inputs = {i.id: i for i in cls.define_schema().inputs}
    out = []
    for name, value in values.items():
        spec = inputs[name]
        if value is None:
            continue
        if isinstance(spec, io.Combo.Input):
            if spec.options and value not in spec.options:
                shown = ", ".join(map(str, spec.options[:12])) + (", ..." if len(spec.options) > 12 else "")
                out.append(f"{name} {value!r} is not one of the choices ({shown}); pick one from the list")
        elif isinstance(spec, (io.Int.Input, io.Float.Input)):
            if spec.min is not None and value < spec.min:
                out.append(f"{name} {value} is below its minimum {spec.min}")
            elif spec.max is not None and value > spec.max:
                out.append(f"{name} {value} is above its maximum {spec.max}")
    return out


def problem(check: Callable[[], object], *needed) -> str | None:
    """The message of the ConceptEditError `check()` raises, or None; not run (None) while any value
    it needs is None (linked: known only when the graph runs)."""
    if any(v is None for v in needed):
        return None
    try:
        check()
    except ConceptEditError as e:
        return str(e)
    return None


def verdict(cls, values: dict, *checks: tuple) -> bool | str:
    """validate_inputs' answer: True, or every problem in one message. `values`: the widgets to check
    against the schema; each check is ``(fn, *the values fn reads)``, run only when those widgets
    passed (a config is never built from a value out of its range or choices)."""
    found = widget_problems(cls, values)
    if not found:
        found = [msg for fn, *needed in checks if (msg := problem(fn, *needed))]
    return True if not found else "; ".join(found)


# ---- the edits folder and text ----------------------------------------------------------------
def register_edits_folder() -> None:
    import folder_paths
    if EDITS_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, EDITS_FOLDER)
        folder_paths.folder_names_and_paths[EDITS_FOLDER] = ([path], {".safetensors"})


def cache_dir(method: str) -> str:
    """Where a method keeps what a rerun or a cancelled run reuses (EMCID's C₀ and stage-1 targets,
    ConceptPrune's calibration statistics): the `concept_edits_cache` folder when one is configured
    (extra_model_paths.yaml), else models/concept_edits_cache; never models/concept_edits, whose files
    the Load Edit dropdown lists."""
    import folder_paths
    known = folder_paths.folder_names_and_paths.get("concept_edits_cache")
    root = known[0][0] if known and known[0] else os.path.join(folder_paths.models_dir, "concept_edits_cache")
    return os.path.join(root, method)


def edits_dir() -> str:
    import folder_paths
    register_edits_folder()
    path = folder_paths.folder_names_and_paths[EDITS_FOLDER][0][0]
    os.makedirs(path, exist_ok=True)
    return path


def list_edits() -> list[str]:
    import folder_paths
    register_edits_folder()
    return folder_paths.get_filename_list(EDITS_FOLDER)


def edit_path(name: str) -> str:
    import folder_paths
    register_edits_folder()
    path = folder_paths.get_full_path(EDITS_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"no edit named {name!r} in models/{EDITS_FOLDER}; refresh the node or save one first")
    return path


def prompt_lines(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    return [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")]


def concepts_from_text(text: str) -> list[str]:
    """One concept per line (commas also separate); blank lines and # comments are ignored."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for part in line.split(","):
            part = part.strip()
            if part:
                out.append(part)
    return out


def unique_path(folder: str, filename: str, default: str) -> str:
    """``folder/<filename>.safetensors``; an existing file is never overwritten (``_001`` ... is added)."""
    base = os.path.basename(filename.strip()) or default
    base = base.removesuffix(".safetensors")
    path = os.path.join(folder, base + ".safetensors")
    i = 1
    while os.path.exists(path):
        path = os.path.join(folder, f"{base}_{i:03d}.safetensors")
        i += 1
    return path
