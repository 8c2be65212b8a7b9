"""ConceptPrune node: find the FFN weights skilled at a concept and prune them on a copy of MODEL."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..comfy_host.jobs import ConceptPruneJob, run
from ..editing.concept_prune.prune import with_preset_defaults
from ..editing.concept_prune.config import OFFICIAL, OFFICIAL_SOURCE, PruneConfig
from ..editing.prompts import PRESET_NAMES, build_pairs, defaults
from .common import CFG_NOTE, EDIT, cache_dir, concepts_from_text, node_schema, output, size_inputs, strength_input, verdict


def prune_cache_dir() -> str:
    """Calibration statistics per prompt batch (`common.cache_dir`): a cancelled or repeated run
    computes only the batches it has not."""
    return cache_dir("prune")


def _preset_defaults(name: str) -> str:
    """'artist 0.01, nudity 0.01, ...': each preset's default of `name`, for the tooltips."""
    return ", ".join(f"{p} {defaults(p)[name]:g}" for p in PRESET_NAMES)


def _config(preset, skill_ratio, tau, steps, cfg, seed, batch_size, official) -> PruneConfig:
    # 0 = the preset's default; the values used are in the edit's params
    return with_preset_defaults(PruneConfig(skill_ratio=skill_ratio, tau=tau, steps=steps, cfg=cfg, seed=seed,
                                            batch_size=batch_size, official=official), preset)


class ConceptPrune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditConceptPrune", "ConceptPrune (erase by pruning)",
            "ConceptPrune (training-free erasure): generates the concept and reference prompts, finds the "
            "feed-forward weights that fire for the concept but not the reference during the first τ "
            "denoising steps, and prunes them on a copy of the model. Cost: one generation per prompt.",
            inputs=[
                io.Model.Input("model", tooltip="An SD-style UNet (SD1.x, SD2.x, SDXL, ...), a DiT (Flux, SD3, Qwen-Image, "
                               "Z-Image, Wan, PixArt, HiDream, ...: its image-stream MLPs), or a bundled tiny one. "
                               "It is never changed."),
                io.Clip.Input("clip", tooltip="The model's text encoder, to encode the calibration prompts."),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="Concepts to erase, one per line (or comma-separated): an artist, "
                                        "'naked', an object, or a tiny-world concept such as 'circle'."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default="artist",
                               tooltip="Prompt pairs: artist (~20 things), nudity (~18 adults), "
                                       "object (~12 scenes), tiny (the tiny model's world), or "
                                       "custom (only the pairs below)."),
                io.Float.Input("skill_ratio", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Share of each weight row that may count as skilled per step. "
                                       "0 = the preset's default (" + _preset_defaults("skill_ratio") + ")."),
                io.Int.Input("tau", default=0, min=0, max=1000,
                             tooltip="Prune weights skilled at any of the first τ denoising steps. 0 = the "
                                     "preset's default (" + _preset_defaults("tau") + "; at most steps)."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Denoising steps of the calibration generations (paper: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the calibration generations (paper: 7.5)."
                                       + CFG_NOTE),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the calibration generations (paper: 0)."),
                io.String.Input("pairs", multiline=True, default="", optional=True,
                                tooltip="Your own pairs, one per line: 'concept prompt | reference prompt'; "
                                        "{concept} is replaced by each concept. Added to the preset's pairs."),
                io.Int.Input("batch_size", default=4, min=1, max=64, optional=True,
                             tooltip="Prompts generated together; lower it if memory runs out."),
                strength_input(optional=True),
                *size_inputs("the calibration generates"),
                io.Combo.Input("official", options=list(OFFICIAL), default="off", optional=True,
                               tooltip="off: the pack's procedure. concept-prune: the authors' code "
                                       "(" + OFFICIAL_SOURCE + "): calibration with SD1.x's PNDM sampler "
                                       "(50 steps = 51 UNet evaluations; τ counts evaluations), float16 "
                                       "seed noise, the empty negative, column norms summed over all "
                                       "tokens, k = int(ratio·4d) with no minimum. Concepts, prompt "
                                       "pairs, ratio, τ, steps, CFG and seed stay yours; the paper's "
                                       "prompt lists are not bundled (give them as pairs)."),
            ],
            outputs=[
                output(io.Model, "model", "A copy of the model with the skilled weights pruned (the input MODEL is "
                                          "unchanged)."),
                output(EDIT, "edit", "The pruning mask with its metadata: save it, or apply it to the same model "
                                     "elsewhere."),
                output(io.String, "info", "Concepts, parameters and the pruned fraction per layer."),
            ],
            aliases=("erase", "unlearn", "nsfw", "nudity", "prune", "remove concept"))

    @classmethod
    def validate_inputs(cls, concepts=None, preset=None, skill_ratio=None, tau=None, steps=None, cfg=None, pairs="",
                        batch_size=4, official="off"):
        values = {"preset": preset, "skill_ratio": skill_ratio, "tau": tau, "steps": steps, "cfg": cfg, "batch_size": batch_size,
                      "official": official}
        return verdict(cls, values,
                       (lambda: build_pairs(concepts_from_text(concepts), preset, pairs), concepts, preset, pairs),
                       (lambda: _config(preset, skill_ratio, tau, steps, cfg, 0, batch_size, official).validate(),
                        *values.values()))

    @classmethod
    def execute(cls, model, clip, concepts, preset, skill_ratio, tau, steps, cfg, seed, pairs="", batch_size=4,
                strength=1.0, width=0, height=0, official="off"):
        job = ConceptPruneJob(concepts=concepts_from_text(concepts), preset=preset, pairs_text=pairs,
                              settings=_config(preset, skill_ratio, tau, steps, cfg, seed, batch_size, official),
                              strength=strength, width=width, height=height, cache_dir=prune_cache_dir())
        patched, _clip, edit, _warnings = run("concept_prune", model, clip, job)
        info = {k: v for k, v in edit.summary().items() if k not in ("keys", "params")}
        return io.NodeOutput(patched, edit, json.dumps(info, indent=1, default=str))


NODES = [ConceptPrune]
