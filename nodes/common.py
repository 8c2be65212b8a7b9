"""What every node module shares: the EDIT socket type, the edits folder, error wrapping."""
from __future__ import annotations

import os

EDIT = "CONCEPT_EDIT"          # socket type carrying an editing.Edit
CATEGORY = "ConceptEdit"
EDITS_FOLDER = "concept_edits"  # models/concept_edits, listed in the Load Edit dropdown
# appended to every guidance-scale tooltip: the pack samples guidance-distilled models at CFG 1
# (editing.diffusion.sampling_cfg), and flow models draw best well below SD's 7.5
CFG_NOTE = (" Flux-dev (guidance-distilled) is always sampled at CFG 1, its guidance embedding at 3.5; "
            "other flow models want less than SD (SD3 about 4.5, Flux-schnell 1).")


def register_edits_folder() -> None:
    import folder_paths
    if EDITS_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, EDITS_FOLDER)
        folder_paths.folder_names_and_paths[EDITS_FOLDER] = ([path], {".safetensors"})


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


def strength_input(default: float = 1.0) -> tuple:
    return ("FLOAT", {"default": default, "min": -4.0, "max": 4.0, "step": 0.05,
                      "tooltip": "How much of the edit to apply: 0 is exactly the original model, 1 the edit."})


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
    base = base[:-len(".safetensors")] if base.endswith(".safetensors") else base
    path = os.path.join(folder, base + ".safetensors")
    i = 1
    while os.path.exists(path):
        path = os.path.join(folder, f"{base}_{i:03d}.safetensors")
        i += 1
    return path


def audited_inputs() -> dict:
    """What every audit node compares: the edited and the original MODEL, and the original's CLIP."""
    return {"edited_model": ("MODEL", {"tooltip": "The model after the edit (e.g. from a ConceptEdit method node)."}),
            "original_model": ("MODEL", {"tooltip": "The model before the edit."}),
            "clip": ("CLIP", {"tooltip": "The original model's text encoder."})}


CONCEPT_PROMPTS = ("STRING", {"multiline": True, "default": "",
                              "tooltip": "Prompts that show the erased concept (one per line)."})


def size_inputs(what: str) -> dict:
    """Optional width/height of the pictures a node generates; 0 = the model's native size."""
    tip = (f"Width/height in pixels of the pictures {what} (multiples of 8); 0 = the model's native size "
           "(SD1.x 512, SD2.x 768, SDXL, SDXL-conditioned layouts, Flux, SD3 and most DiTs 1024, "
           "HunyuanImage 2.1 2048, Wan 2.1 512, the tiny models their own).")
    return {"width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": tip}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": tip})}
