"""Closed-form cross-attention edit (UCE-style) and Export LoRA nodes."""
from __future__ import annotations

import os

from ..comfy_host.jobs import UCEJob, export_lora, uce
from ..editing.export.lora import LoraExportConfig
from ..editing.uce.closed_form import EMPTY_GUIDES, EXPANSIONS, MODES, UCEConfig
from .common import CATEGORY, EDIT, concepts_from_text, unique_path


def loras_dir() -> str:
    import folder_paths
    path = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(path, exist_ok=True)
    return path


class CrossAttentionEdit:
    DESCRIPTION = ("Closed-form edit of every cross-attention key/value projection (UCE): erase, redirect, "
                   "debias or moderate many concepts at once in seconds, keeping a preserve set unchanged. "
                   "The input MODEL is not modified; the EDIT carries the change and its preservation metrics.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", EDIT)
    RETURN_NAMES = ("model", "edit")
    OUTPUT_TOOLTIPS = ("A copy of the model with the edit applied as patches.",
                       "The edit (low-rank or dense per layer) with metrics: preserve_rel_change_mean is how much "
                       "the preserve prompts' keys/values moved.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to edit (cloned, never changed)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder: it encodes the concepts, guides and preserve prompts."}),
            "concepts": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "One concept per line (or comma-separated). 'source -> target' gives a line its own guide."}),
            "mode": (list(MODES), {"default": "erase", "tooltip": "erase: concept -> guide (default the empty prompt); "
                                   "redirect: concept -> another concept; debias: mix the guide's options; "
                                   "moderate: every concept -> unconditional."}),
            "guide": ("STRING", {"default": "", "tooltip": "erase/redirect: what the concepts become (empty = unconditional). "
                                 "debias: options with weights, e.g. 'male:0.5, female:0.5'. Ignored by moderate."}),
            "preserve": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "Concepts that must stay unchanged (one per line), added to the defaults."}),
            "default_preserve": ("BOOLEAN", {"default": True, "tooltip": "Also preserve ~30 generic prompts (a photo, a person, a dog, ...)."}),
            "lam": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1000.0, "step": 0.05,
                              "tooltip": "λ: how strongly every direction stays at the original weights."}),
            "erase_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                      "tooltip": "Weight of the edited concepts' targets (s_e)."}),
            "preserve_scale": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.05,
                                         "tooltip": "Weight of keeping the preserve prompts unchanged (s_p)."}),
            "token_window": (["aligned", "eos", "last"], {"default": "aligned", "tooltip": "aligned: edit the concept's "
                             "words, EOS and padding (strongest); eos: its words through EOS (cheapest for thousands of "
                             "concepts); last: only the last word token (the newer UCE code)."}),
        }, "optional": {
            "expand": (list(EXPANSIONS), {"default": "none", "tooltip": "Also edit each concept in the official "
                       "templates: artist ('painting by X', 'art by X', 'artwork by X', 'picture by X', 'style of X'; "
                       "an empty guide becomes 'art') or object ('image/photo/portrait/picture/painting of X')."}),
            "empty_guide": (list(EMPTY_GUIDES), {"default": "eos", "tooltip": "With the 'last' window and an empty "
                            "guide: map the concept's last token to the empty prompt's EOS (eos) or, as the official "
                            "code does, to its BOS (bos)."}),
        }}

    def execute(self, model, clip, concepts, mode, guide, preserve, default_preserve, lam, erase_scale,
                preserve_scale, token_window, expand="none", empty_guide="eos"):
        cfg = UCEConfig(concepts=concepts_from_text(concepts), mode=mode, guide=guide, preserve=concepts_from_text(preserve),
                        default_preserve=default_preserve, lam=lam, erase_scale=erase_scale,
                        preserve_scale=preserve_scale, token_window=token_window, expand=expand,
                        empty_guide=empty_guide)
        out = uce(model, clip, UCEJob(settings=cfg))
        return (out.model, out.edit)


class ExportLoRA:
    DESCRIPTION = ("Write an edit as a LoRA file in models/loras that stock LoraLoader, Automatic1111 and diffusers "
                   "load. Low-rank edits are exact; dense ones are compressed by SVD (the error is reported); "
                   "pruning masks become full '.diff' modules and need the MODEL/CLIP they were made for.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("File name, modules, ranks and the SVD's relative error.",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "edit": (EDIT, {"tooltip": "The edit to export (from any ConceptEdit method or Load Edit)."}),
            "filename": ("STRING", {"default": "concept_edit_lora", "tooltip": "File name in models/loras (no extension); never overwrites."}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Cap on the rank per layer; 0 = exact for "
                             "low-rank edits and the smallest rank within max_rel_error for dense ones."}),
            "max_rel_error": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 0.99, "step": 0.005,
                                        "tooltip": "Dense edits: largest relative error the SVD may leave per layer."}),
            "dense_as": (["svd", "diff"], {"default": "svd", "tooltip": "Dense edits as low-rank SVD (all hosts) or exact full '.diff' deltas (ComfyUI, A1111; big)."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "Needed only for pruning masks (their delta depends on the base weights)."}),
            "clip": ("CLIP", {"tooltip": "Needed only for pruning masks on the text encoder."}),
        }}

    def execute(self, edit, filename, rank, max_rel_error, dense_as, model=None, clip=None):
        cfg = LoraExportConfig(rank=rank, max_rel_error=max_rel_error, dense_as=dense_as)
        path = unique_path(loras_dir(), filename, "concept_edit_lora")  # never overwrite
        rep = export_lora(edit, path, cfg, model, clip)
        text = (f"{os.path.basename(rep['path'])}: {rep['modules']} modules ({rep['diff_modules']} diff), "
                f"max rank {rep['max_rank']}, max relative error {rep['max_rel_error']:.3g}, {rep['bytes'] / 1e6:.1f} MB")
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "ConceptEditCrossAttentionEdit": CrossAttentionEdit,
    "ConceptEditExportLoRA": ExportLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEditCrossAttentionEdit": "Cross-Attention Edit (UCE closed form)",
    "ConceptEditExportLoRA": "Export Edit as LoRA",
}
