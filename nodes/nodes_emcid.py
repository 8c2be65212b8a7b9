"""EMCID text-encoder edit node: many "source -> destination" concepts at once, on a copy of the CLIP."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..comfy_host.jobs import EmcidJob, run
from ..editing.emcid.presets import FAMILY_DEFAULTS
from ..editing.emcid.stage2 import parse_pairs, validate_pairs
from ..editing.emcid.config import DEFAULT_TEMPLATES, LAM_MODES, OFFICIAL, RESIDUALS, EmcidConfig
from .common import EDIT, cache_dir, node_schema, output, size_inputs, verdict


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
    """C₀ and stage-1 targets (`common.cache_dir`)."""
    return cache_dir("emcid")


def _settings(lam, steps, use_stage1, templates, seed, residual, lam_mode, official, stage1_batch) -> EmcidConfig:
    tpl = tuple(t.strip() for t in (templates or "").splitlines() if t.strip()) or DEFAULT_TEMPLATES
    # 0 = the model family's default; the values used are in the edit's params
    return EmcidConfig(lam=lam or None, lam_mode=lam_mode, steps=steps or None, use_stage1=use_stage1,
                       templates=tpl, seed=seed, residual=None if residual == "auto" else residual,
                       official=official, stage1_batch=stage1_batch)


class TextEncoderEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditTextEncoderEdit", "Text Encoder Edit (EMCID)",
            "EMCID: edit the text encoder so each source concept is understood as its destination "
            "(1 to 1,000 concepts at once, closed form). Stage 1 (optional, per concept, cached) finds "
            "targets with the diffusion model; stage 2 writes all of them into the CLIP's MLP layers while "
            "keeping generic text unchanged. The input CLIP is not modified.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder to edit (it is cloned, never changed)."),
                io.Model.Input("model", tooltip="The diffusion model of the same checkpoint: gives the model family and "
                                                "runs stage 1."),
                io.String.Input("concepts", multiline=True, default="cat -> dog",
                                tooltip="One 'source -> destination' per line (e.g. 'van gogh -> a painter'); "
                                        "an empty destination ('nudity ->') maps to the bare template. "
                                        "# starts a comment."),
                io.Float.Input("lam", default=0.0, min=0.0, max=1e7, step=0.1, round=0.001,
                               tooltip="λ: how strongly generic text is preserved. Higher keeps more of the original "
                                       "model, lower makes the edit reach further. Counted as lam_mode says "
                                       "(relative by default: per dimension of each edited layer's keys, so a value "
                                       "means the same on any text encoder width). A value here applies to every "
                                       "text encoder; 0 = the model family's default per encoder, relative: "
                                       + _family_defaults("lam", relative=True)
                                       + "; absolute (the official code's where it has one): "
                                       + _family_defaults("lam") + ")."),
                io.Int.Input("steps", default=0, min=0, max=2000,
                             tooltip="Stage-1 optimisation steps per concept. 0 = the model family's default ("
                                     + _family_defaults("steps") + "); learning rate, weight decay, norm clamp "
                                     "and pooled-output weight always follow the family (see the edit's params)."),
                io.Boolean.Input("use_stage1", default=True,
                                 tooltip="On: optimise each concept's target against the diffusion model "
                                         "(slower, cached on disk). Off: use the destination's own text "
                                         "features as the target (seconds)."),
                io.String.Input("templates", multiline=True, default="\n".join(DEFAULT_TEMPLATES), optional=True,
                                tooltip="Prompts the concept is read in, one per line; '{}' marks the concept."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed for the stage-1 source images and timesteps."),
                io.Combo.Input("residual", options=["auto", *RESIDUALS], default="auto", optional=True,
                               tooltip="Stage 2's residual at each edited layer: official = target minus "
                                       "that layer's MLP output (EMCID's code); memit = target minus the "
                                       "last edited layer's output (MEMIT's); auto = the model family's "
                                       "(official on SD1/SD2/SDXL and SD3's CLIPs, memit on T5: "
                                       "Flux's, SD3's, Chroma's, PixArt's, AuraFlow's, Wan's; and on "
                                       "the LLM encoders of Qwen-Image, HunyuanImage 2.1, Z-Image and "
                                       "Flux.2)."),
                io.Combo.Input("lam_mode", options=list(LAM_MODES), default="relative", optional=True,
                               tooltip="How lam counts. relative: λ = lam × the width of each edited "
                                       "layer's keys (its MLP width), so the family default that is "
                                       "SD1.5's official 4000 on CLIP-L's 3072-wide keys keeps the same "
                                       "strength on a narrower or wider text encoder. absolute: lam is "
                                       "the paper's λ as written (4000-10000 on real CLIPs), and 0 the "
                                       "official number. The report shows both for every encoder."),
                *size_inputs("stage 1 draws of each source concept"),
                io.Combo.Input("official", options=list(OFFICIAL), default="off", optional=True,
                               tooltip="off: the pack's defaults. emcid: the official EMCID code's procedure "
                                       "(github SilentView/EMCID, commit 10a392a: emcid_main.py, compute_z.py, "
                                       "layer_stats.py) for these concepts, prompts, λ and steps: its "
                                       "SD1.4/SDXL hyper-parameters (also on other SD-style models), λ "
                                       "absolute (0 = 4000; SDXL 4000 / 10000), C0 from 100k captions in "
                                       "float32, stage 1 always on with 50-step CFG 7.5 pictures, prompts "
                                       "padded to the longest and masked, HF's pooled outputs, h from the "
                                       "first prompt. Settings it has no place for are ignored and named in "
                                       "the report's warnings. Refused on T5/LLM encoders (no official code)."),
                io.Int.Input("stage1_batch", default=0, min=0, max=1024, optional=True,
                             tooltip="Stage 1: how many concepts are optimised together (one denoiser pass "
                                     "for all of them per step; the same targets as one at a time). 0 = "
                                     "automatic (from free GPU memory; 8 on a CPU), 1 = one at a time."),
            ],
            outputs=[
                output(io.Clip, "clip", "A copy of the CLIP with the edit applied as patches."),
                output(EDIT, "edit", "The edit (save it, export it, or apply it elsewhere)."),
                output(io.String, "report", "Per-stage metrics: loss before/after stage 1, share of the target gap "
                                            "left after stage 2."),
            ],
            aliases=("erase", "unlearn", "nsfw", "emcid", "redirect", "text encoder", "clip edit", "remove concept"))

    @classmethod
    def validate_inputs(cls, concepts=None, lam=None, steps=None, templates=None, residual="auto",
                        lam_mode="relative", official="off", stage1_batch=0):
        values = {"lam": lam, "steps": steps, "residual": residual, "lam_mode": lam_mode, "official": official,
                      "stage1_batch": stage1_batch}
        config = lambda: _settings(lam, steps, True, templates, 0, residual, lam_mode, official,
                                   stage1_batch).validate()
        return verdict(cls, values, (lambda: validate_pairs(parse_pairs(concepts)), concepts),
                       (config, *values.values()))

    @classmethod
    def execute(cls, clip, model, concepts: str, lam: float, steps: int, use_stage1: bool,
                templates: str | None = None, seed: int = 0, residual: str = "auto", lam_mode: str = "relative",
                width: int = 0, height: int = 0, official: str = "off", stage1_batch: int = 0):
        cfg = _settings(lam, steps, use_stage1, templates, seed, residual, lam_mode, official, stage1_batch)
        job = EmcidJob(pairs=parse_pairs(concepts), settings=cfg, cache_dir=emcid_cache_dir(), width=width,
                       height=height)
        _model, out_clip, edit, _warnings = run("emcid", model, clip, job)
        return io.NodeOutput(out_clip, edit, json.dumps(edit.metrics, indent=1, default=str))


NODES = [TextEncoderEdit]
