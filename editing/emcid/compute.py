"""EMCID end to end: the layers to edit, stage 1's targets (`stage1`) or the destinations' own
states, then stage 2's closed-form solve per encoder (`stage2`), as one `Edit`. Kept apart from both
stages so that neither imports the other: stage 1 reads stage 2's prompt and key helpers, and this
module runs them in order."""
from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import torch

from ..arch import Family, TextEncoderSpec
from ..arch.text import llm_edit_layers
from ..edit import Change, Edit
from ..errors import InvalidInputError
from ..hosts import Host, RunContext, Text
from .config import EmcidConfig, EmcidJob
from .official import settings as official_settings
from .presets import defaults_for
from .stage1 import optimise_targets
from .stage2 import (concept_prompts, reach_warning, read_keys, resolve_defaults, second_moments, stage2,
                     to_change, validate_pairs)

log = logging.getLogger(__name__)


def edit_layers(family: Family, text: Text, cfg: EmcidConfig) -> dict[str, tuple[TextEncoderSpec, tuple[int, ...]]]:
    """{encoder: (its spec, the fc2 layers to edit)}: the encoders the family's table edits (every
    one, except on Flux: T5 alone), plus any `cfg.layers` names; `cfg.layers` mapping an encoder to
    () leaves it out. On an encoder the model reads at a hidden layer (the host's `read_layer`: an
    LLM's), the default is MEMIT's band up to that layer and a layer after it is refused: its output
    never reaches the model."""
    _, table = defaults_for(family.name, text.encoders, family.kind)
    specs = {te.name: te for te in family.text_encoders}
    given = dict(cfg.layers or {})
    unknown = sorted(set(given) - set(text.encoders))
    if unknown:
        raise InvalidInputError(f"layers are given for {', '.join(unknown)}, which this CLIP does not have "
                                f"(its text encoders: {', '.join(text.encoders)})")
    wanted = [e for e in text.encoders if e in given or table.encoders is None or e in table.encoders]
    missing = [e for e in (table.encoders or ()) if e not in text.encoders]
    out = {}
    for enc in wanted:
        spec = specs.get(enc)
        if spec is None:
            raise InvalidInputError(f"the CLIP has a text encoder {enc!r} that the {family.label} layout does not "
                                    f"have ({', '.join(specs)}); is this CLIP from the same checkpoint as the model?")
        read = getattr(text, "read_layer", lambda _e: None)(enc)
        default = llm_edit_layers(read) if read is not None and spec.kind == "llm" else spec.edit_layers
        layers = tuple(given.get(enc, default))
        if enc in given and not layers:
            continue
        if not layers or any(not 0 <= i < spec.layers for i in layers) or list(layers) != sorted(set(layers)):
            raise InvalidInputError(f"{enc}: edit layers must be increasing indices in 0..{spec.layers - 1}, got {layers}")
        if read is not None and max(layers) > read:
            raise InvalidInputError(f"{enc}: layer {max(layers)} comes after layer {read}, the last one whose output "
                                    f"this model reads, so an edit there changes nothing: choose layers in 0..{read}")
        out[enc] = (spec, layers)
    if not out:
        if missing:
            raise InvalidInputError(f"EMCID on this {family.label} edits its {', '.join(missing)} text encoder, which "
                                    f"this CLIP does not have (it has {', '.join(text.encoders)}): connect the "
                                    "checkpoint's own CLIP (Flux: clip_l + t5xxl, e.g. DualCLIPLoader type flux)")
        raise InvalidInputError("no text-encoder layers to edit: every encoder was given no layers; give one "
                                "encoder its layers, or leave layers unset for the family's")
    return out


def destination_targets(text: Text, encoder: str, dests: Sequence[str], cfg: EmcidConfig,
                        last: int) -> torch.Tensor:
    """Without stage 1: z = the destination's own hidden state at its last token (averaged over templates)."""
    p = concept_prompts(text, dests, cfg.templates)
    _, H = read_keys(text, encoder, p, None, last, None, cfg.batch)
    return H


def compute_emcid(text: Text, family: Family, pairs: Sequence[tuple[str, str]], cfg: EmcidConfig | None = None,
                  ctx: RunContext | None = None, denoiser=None, cache_dir: str | None = None,
                  fingerprint: Mapping[str, str] | None = None, on_concepts=None) -> Edit:
    """Edit the text encoder(s) so each source concept is read as its destination.

    `denoiser` (a `Denoiser` + `Trainable` host) is needed for stage 1 only. `cache_dir` keeps C₀
    and the stage-1 targets between runs. The model is not changed; the result is an `Edit` of the
    fc2 weights (ComfyUI CLIP patch keys). `on_concepts(done, total)`: stage 1's finished concepts,
    before each of its progress reports (a host's progress text).

    Under torchrun (`editing.distributed`) stage 1's concepts and C₀'s captions are split over the
    processes; every process returns the same edit (rank 0 writes it)."""
    cfg = cfg or EmcidConfig()
    cfg.validate()
    validate_pairs(pairs)
    ctx = ctx or RunContext()
    said: list[str] = []
    if cfg.official != "off":
        cfg, used, said = official_settings(cfg, family, text)
    else:
        cfg, used = resolve_defaults(cfg, family.name, text.encoders, family.kind)
    plan = edit_layers(family, text, cfg)
    if cfg.use_stage1 and denoiser is None:
        raise InvalidInputError("EMCID stage 1 needs the diffusion MODEL; connect it or turn off use_stage1"
                                + (" and official" if cfg.official != "off" else ""))
    t0 = time.perf_counter()
    srcs = [s for s, _ in pairs]
    dsts = [d for _, d in pairs]
    metrics: dict = {"concepts": len(pairs)}
    if cfg.use_stage1:
        targets, m1 = optimise_targets(text, denoiser, pairs, {e: ls[-1] for e, (_, ls) in plan.items()}, cfg, ctx,
                                       cache_dir=cache_dir, fingerprint=fingerprint, on_concepts=on_concepts)
        metrics["stage1"] = m1
    else:
        targets = {e: destination_targets(text, e, dsts, cfg, ls[-1]) for e, (_, ls) in plan.items()}
    t1 = time.perf_counter()
    changes: dict[str, Change] = {}
    metrics["stage2"] = {}
    for enc, (spec, layers) in plan.items():
        C0 = second_moments(text, enc, layers, cfg, ctx, cache_dir)
        prompts = concept_prompts(text, srcs, cfg.templates)
        ups, m2 = stage2(text, enc, layers, prompts, targets[enc], C0, cfg.lam_value(enc), cfg.batch, ctx,
                         residual=cfg.residual_for(enc), lam_mode=cfg.lam_mode)
        width = int(C0[layers[0]].shape[0])
        # `lam`: the absolute λ the solve used (every fc2 layer of an encoder has the same width);
        # `lam_rel`: the same per key dimension; both whatever lam_mode the config counted in
        lam_abs = m2["lam_per_layer"][0]
        m2.update(lam=lam_abs, lam_rel=cfg.lam_value(enc) if cfg.lam_mode == "relative" else lam_abs / width,
                  key_width=width, lam_mode=cfg.lam_mode)
        for layer, up, down in ups:
            changes[spec.fc2_key(layer)] = to_change(spec, up, down)
        metrics["stage2"][enc] = m2
        log.info("EMCID %s: gap left %.3f after %d layers, each writing %s of its change at λ %g (%g per key "
                 "dimension)", enc, m2["gap_after"], len(layers), ", ".join(f"{r:.2f}" for r in m2["reach_per_layer"]),
                 m2["lam"], m2["lam_rel"])
    warned = said + [w for enc, m in metrics["stage2"].items() if (w := reach_warning(enc, m))]
    for w in warned:
        log.warning("EMCID %s", w)
    if warned:
        metrics["warnings"] = warned
    metrics["seconds"] = {"stage1": round(t1 - t0, 2), "stage2": round(time.perf_counter() - t1, 2)}
    edit = Edit(method="emcid", family=family.name, changes=changes, concepts=[f"{s} -> {d}" for s, d in pairs],
                params={**cfg.to_dict(), "family_defaults": used}, fingerprint=dict(fingerprint or {}), metrics=metrics)
    edit.check_finite()
    return edit


def compute(host: Host, config: EmcidJob) -> Edit:
    """EMCID as a method: the host's text encoders edited (stage 1 runs its denoiser), with both made
    usable by autograd for the duration; the edit is of the text encoders' fc2 weights."""
    cfg = config.settings
    what = "The Text Encoder Edit (EMCID)"
    host.check_text_path(what)
    host.check_clip()
    text = host.text_layers()
    why = getattr(text, "emcid_refusal", lambda: None)()
    if why:
        raise InvalidInputError(f"{what} cannot edit this {host.family.label}: {why}. Use {host.alternatives()} on "
                                "this model instead (the Red-Team Audit's prompt attacks do run on its text encoder)")
    denoiser = host.denoiser if cfg.runs_stage1 else None
    with host.training(model=cfg.runs_stage1, text=True):
        return compute_emcid(text, host.family, list(config.pairs), cfg, host.ctx, denoiser=denoiser,
                             cache_dir=config.cache_dir, fingerprint=host.fingerprint, on_concepts=host.ctx.items)
