"""EMCID text-encoder edit node: many "source -> destination" concepts at once, on a copy of the CLIP."""
from __future__ import annotations

import json
import os

from ..comfy_host.jobs import EmcidJob, emcid
from ..editing.emcid.presets import FAMILY_DEFAULTS
from ..editing.emcid.stage2 import DEFAULT_TEMPLATES, LAM_MODES, OFFICIAL, RESIDUALS, EmcidConfig, parse_pairs
from .common import CATEGORY, EDIT, size_inputs


def _family_defaults(name: str, relative: bool = False) -> str:
    """'SD1 4000, SD2 4000, SDXL clip_l 4000 / clip_g 10000, tiny 1000': the table's values, for the
    tooltips; `relative`: λ per key dimension ('SD1 1.302, ...')."""
    labels = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "tiny": "tiny", "flux1": "Flux (T5)",
              "tiny-flux": "tiny Flux (T5)", "sd3-medium": "SD3", "chroma": "a T5 alone (Chroma, PixArt, AuraFlow, Wan)",
              "qwen-image": "LLM encoders (Qwen-Image, HunyuanImage 2.1, Z-Image, Flux.2)"}

    def lam(d, encoder: str) -> float:
        return round(d.relative_lam_for(encoder), 3) if relative else d.lam_for(encoder)

    out = []
    for fam, d in FAMILY_DEFAULTS.items():
        if fam not in labels:  # SD3.5 large shares SD3's table
            continue
        if name == "lam" and d.lam_per_encoder:
            out.append(f"{labels[fam]} " + " / ".join(f"{e} {lam(d, e):g}" for e in d.lam_per_encoder))
        elif name == "lam":
            out.append(f"{labels[fam]} {lam(d, ''):g}")
        else:
            out.append(f"{labels[fam]} {getattr(d, name):g}")
    return ", ".join(out)


def emcid_cache_dir() -> str:
    """C₀ and stage-1 targets live next to the models (not in models/concept_edits, whose files the
    Load Edit dropdown lists)."""
    import folder_paths
    return os.path.join(folder_paths.models_dir, "concept_edits_cache", "emcid")


class TextEncoderEdit:
    DESCRIPTION = ("EMCID: edit the text encoder so each source concept is understood as its destination "
                   "(1 to 1,000 concepts at once, closed form). Stage 1 (optional, per concept, cached) finds "
                   "targets with the diffusion model; stage 2 writes all of them into the CLIP's MLP layers while "
                   "keeping generic text unchanged. The input CLIP is not modified.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP", EDIT, "STRING")
    RETURN_NAMES = ("clip", "edit", "report")
    OUTPUT_TOOLTIPS = ("A copy of the CLIP with the edit applied as patches.",
                       "The edit (save it, export it, or apply it elsewhere).",
                       "Per-stage metrics: loss before/after stage 1, share of the target gap left after stage 2.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder to edit (it is cloned, never changed)."}),
            "model": ("MODEL", {"tooltip": "The diffusion model of the same checkpoint: gives the model family and "
                                           "runs stage 1."}),
            "concepts": ("STRING", {"multiline": True, "default": "cat -> dog",
                                    "tooltip": "One 'source -> destination' per line (e.g. 'van gogh -> a painter'); "
                                               "an empty destination ('nudity ->') maps to the bare template. "
                                               "# starts a comment."}),
            "lam": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e7, "step": 0.1, "round": 0.001,
                              "tooltip": "λ: how strongly generic text is preserved. Higher keeps more of the original "
                                         "model, lower makes the edit reach further. Counted as lam_mode says "
                                         "(relative by default: per dimension of each edited layer's keys, so a value "
                                         "means the same on any text encoder width). A value here applies to every "
                                         "text encoder; 0 = the model family's default per encoder, relative: "
                                         + _family_defaults("lam", relative=True)
                                         + "; absolute (the official code's where it has one): "
                                         + _family_defaults("lam") + ")."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 2000,
                              "tooltip": "Stage-1 optimisation steps per concept. 0 = the model family's default ("
                                         + _family_defaults("steps") + "); learning rate, weight decay, norm clamp "
                                         "and pooled-output weight always follow the family (see the edit's params)."}),
            "use_stage1": ("BOOLEAN", {"default": True,
                                       "tooltip": "On: optimise each concept's target against the diffusion model "
                                                  "(slower, cached on disk). Off: use the destination's own text "
                                                  "features as the target (seconds)."}),
        }, "optional": {
            "templates": ("STRING", {"multiline": True, "default": "\n".join(DEFAULT_TEMPLATES),
                                     "tooltip": "Prompts the concept is read in, one per line; '{}' marks the concept."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Seed for the stage-1 source images and timesteps."}),
            "residual": (["auto", *RESIDUALS], {"default": "auto",
                                                "tooltip": "Stage 2's residual at each edited layer: official = target minus "
                                                           "that layer's MLP output (EMCID's code); memit = target minus the "
                                                           "last edited layer's output (MEMIT's); auto = the model family's "
                                                           "(official on SD1/SD2/SDXL and SD3's CLIPs, memit on T5: "
                                                           "Flux's, SD3's, Chroma's, PixArt's, AuraFlow's, Wan's; and on "
                                                           "the LLM encoders of Qwen-Image, HunyuanImage 2.1, Z-Image and "
                                                           "Flux.2)."}),
            "lam_mode": (list(LAM_MODES), {"default": "relative",
                                           "tooltip": "How lam counts. relative: λ = lam × the width of each edited "
                                                      "layer's keys (its MLP width), so the family default that is "
                                                      "SD1.5's official 4000 on CLIP-L's 3072-wide keys keeps the same "
                                                      "strength on a narrower or wider text encoder. absolute: lam is "
                                                      "the paper's λ as written (4000-10000 on real CLIPs), and 0 the "
                                                      "official number. The report shows both for every encoder."}),
            **size_inputs("stage 1 draws of each source concept"),
            "official": (list(OFFICIAL), {"default": "off",
                                          "tooltip": "off: the pack's defaults. emcid: the official EMCID code's procedure "
                                                     "(github SilentView/EMCID, commit 10a392a: emcid_main.py, compute_z.py, "
                                                     "layer_stats.py) for these concepts, prompts, λ and steps: its "
                                                     "SD1.4/SDXL hyper-parameters (also on other SD-style models), λ "
                                                     "absolute (0 = 4000; SDXL 4000 / 10000), C0 from 100k captions in "
                                                     "float32, stage 1 always on with 50-step CFG 7.5 pictures, prompts "
                                                     "padded to the longest and masked, HF's pooled outputs, h from the "
                                                     "first prompt. Settings it has no place for are ignored and named in "
                                                     "the report's warnings. Refused on T5/LLM encoders (no official code)."}),
            "stage1_batch": ("INT", {"default": 0, "min": 0, "max": 1024,
                                     "tooltip": "Stage 1: how many concepts are optimised together (one denoiser pass "
                                                "for all of them per step; the same targets as one at a time). 0 = "
                                                "automatic (from free GPU memory; 8 on a CPU), 1 = one at a time."}),
        }}

    def execute(self, clip, model, concepts: str, lam: float, steps: int, use_stage1: bool,
                templates: str | None = None, seed: int = 0, residual: str = "auto", lam_mode: str = "relative",
                width: int = 0, height: int = 0, official: str = "off", stage1_batch: int = 0):
        tpl = tuple(t.strip() for t in (templates or "").splitlines() if t.strip()) or DEFAULT_TEMPLATES
        # 0 = the model family's default; the values used are in the edit's params
        cfg = EmcidConfig(lam=lam or None, lam_mode=lam_mode, steps=steps or None, use_stage1=use_stage1,
                          templates=tpl, seed=seed, residual=None if residual == "auto" else residual,
                          official=official, stage1_batch=stage1_batch)
        _model, out_clip, edit, _warnings = emcid(model, clip, EmcidJob(pairs=parse_pairs(concepts), settings=cfg,
                                                                        cache_dir=emcid_cache_dir(), width=width,
                                                                        height=height))
        return (out_clip, edit, json.dumps(edit.metrics, indent=1, default=str))


NODE_CLASS_MAPPINGS = {"ConceptEditTextEncoderEdit": TextEncoderEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEditTextEncoderEdit": "Text Encoder Edit (EMCID)"}
