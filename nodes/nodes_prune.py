"""ConceptPrune node: find the FFN weights skilled at a concept and prune them on a copy of MODEL."""
from __future__ import annotations

import json

from ..comfy_host.jobs import ConceptPruneJob, concept_prune
from ..editing.concept_prune.prune import OFFICIAL, OFFICIAL_SOURCE, PruneConfig, with_preset_defaults
from ..editing.prompts import PRESET_NAMES, defaults
from .common import CATEGORY, CFG_NOTE, EDIT, concepts_from_text, size_inputs, strength_input


def _preset_defaults(name: str) -> str:
    """'artist 0.01, nudity 0.01, ...': each preset's default of `name`, for the tooltips."""
    return ", ".join(f"{p} {defaults(p)[name]:g}" for p in PRESET_NAMES)


class ConceptPrune:
    DESCRIPTION = ("ConceptPrune (training-free erasure): generates the concept and reference prompts, finds the "
                   "feed-forward weights that fire for the concept but not the reference during the first τ "
                   "denoising steps, and prunes them on a copy of the model. Cost: one generation per prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", EDIT, "STRING")
    RETURN_NAMES = ("model", "edit", "info")
    OUTPUT_TOOLTIPS = ("A copy of the model with the skilled weights pruned (the input MODEL is unchanged).",
                       "The pruning mask with its metadata: save it, or apply it to the same model elsewhere.",
                       "Concepts, parameters and the pruned fraction per layer.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD-style UNet (SD1.x, SD2.x, SDXL, ...), a DiT (Flux, SD3, Qwen-Image, Z-Image, "
                                           "Wan, PixArt, HiDream, ...: its image-stream MLPs), or a bundled tiny one. "
                                           "It is never changed."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder, to encode the calibration prompts."}),
            "concepts": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "Concepts to erase, one per line (or comma-separated): an artist, "
                                               "'naked', an object, or a tiny-world concept such as 'circle'."}),
            "preset": (list(PRESET_NAMES), {"default": "artist",
                                            "tooltip": "Prompt pairs: artist (~20 things), nudity (~18 adults), "
                                                       "object (~12 scenes), tiny (the tiny model's world), or "
                                                       "custom (only the pairs below)."}),
            "skill_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Share of each weight row that may count as skilled per step. "
                                                 "0 = the preset's default (" + _preset_defaults("skill_ratio") + ")."}),
            "tau": ("INT", {"default": 0, "min": 0, "max": 1000,
                            "tooltip": "Prune weights skilled at any of the first τ denoising steps. 0 = the "
                                       "preset's default (" + _preset_defaults("tau") + "; at most steps)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "Denoising steps of the calibration generations (paper: 50)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale of the calibration generations (paper: 7.5)." + CFG_NOTE}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Noise seed of the calibration generations (paper: 0)."}),
        }, "optional": {
            "pairs": ("STRING", {"multiline": True, "default": "",
                                 "tooltip": "Your own pairs, one per line: 'concept prompt | reference prompt'; "
                                            "{concept} is replaced by each concept. Added to the preset's pairs."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Prompts generated together; lower it if memory runs out."}),
            "strength": strength_input(),
            **size_inputs("the calibration generates"),
            "official": (list(OFFICIAL), {"default": "off",
                                          "tooltip": "off: the pack's procedure. concept-prune: the authors' code "
                                                     "(" + OFFICIAL_SOURCE + "): calibration with SD1.x's PNDM sampler "
                                                     "(50 steps = 51 UNet evaluations; τ counts evaluations), float16 "
                                                     "seed noise, the empty negative, column norms summed over all "
                                                     "tokens, k = int(ratio·4d) with no minimum. Concepts, prompt "
                                                     "pairs, ratio, τ, steps, CFG and seed stay yours; the paper's "
                                                     "prompt lists are not bundled (give them as pairs)."}),
        }}

    def execute(self, model, clip, concepts, preset, skill_ratio, tau, steps, cfg, seed, pairs="", batch_size=4,
                strength=1.0, width=0, height=0, official="off"):
        # 0 = the preset's default; the values used are in the edit's params
        config = with_preset_defaults(PruneConfig(skill_ratio=skill_ratio, tau=tau, steps=steps, cfg=cfg, seed=seed,
                                                  batch_size=batch_size, official=official), preset)
        job = ConceptPruneJob(concepts=concepts_from_text(concepts), preset=preset, pairs_text=pairs, settings=config,
                              strength=strength, width=width, height=height)
        patched, _clip, edit, _warnings = concept_prune(model, clip, job)
        info = {k: v for k, v in edit.summary().items() if k not in ("keys", "params")}
        return (patched, edit, json.dumps(info, indent=1, default=str))


NODE_CLASS_MAPPINGS = {"ConceptEditConceptPrune": ConceptPrune}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEditConceptPrune": "ConceptPrune (erase by pruning)"}
