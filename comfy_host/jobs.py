"""The jobs the nodes, the command line and the benches share: a library method run on ComfyUI's
MODEL/CLIP, its result applied to a clone (the input is never changed).

Kept out of `nodes/` so that `cli/` and `bench/` do not import node classes, and out of `editing/`
because it speaks ComfyUI.
"""
from __future__ import annotations

import logging

import torch

from ..editing.concept_prune import PruneConfig, compute_concept_prune
from ..editing.edit import Change, Edit
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext
from ..editing.lora import LoraExportConfig, save_lora
from ..editing.presence import PresenceComparison, PresenceConfig, compare_presence, image_grid, spread_timesteps
from ..editing.prompts import build_pairs
from ..editing.resurgence import DEFAULT_BENIGN, AuditConfig, audit, guidance_presence
from ..editing.uce import UCEConfig, compute_uce
from ..editing.unlearn import UnlearnConfig, compute_unlearn
from .adapters import (ComfyDenoiser, ComfyText, apply_edit, clip_state, model_family, model_fingerprint,
                       original_weights, run_context)

log = logging.getLogger(__name__)


def latent_size(width: int = 0, height: int = 0) -> tuple[int, int] | None:
    """Pixels (a node's width/height, 0 = the model's native size) -> latent (height, width) cells."""
    if not width and not height:
        return None
    if min(width, height) < 8:
        raise InvalidInputError(f"give both width and height of at least 8 pixels (or 0 for the model's native size), "
                                f"got {width}×{height}")
    return height // 8, width // 8


def concept_prune(model, clip, concepts: list[str], preset: str, pairs_text: str, config: PruneConfig,
                  ctx: RunContext | None = None, latent: tuple[int, int] | None = None) -> Edit:
    """ConceptPrune on a ComfyUI MODEL/CLIP (shared by the node and the command line); `latent` is
    the (height, width) the calibration generates at (None: the model's native size)."""
    family = model_family(model)  # a clear error for a model without cross-attention
    pairs = build_pairs(concepts, preset, pairs_text)
    ctx = ctx or RunContext()
    denoiser = ComfyDenoiser(model, clip, ctx=ctx, latent_hw=latent)
    return compute_concept_prune(denoiser, family, pairs, config, ctx, fingerprint=model_fingerprint(model))


def cross_attention_edit(model, clip, config: UCEConfig, ctx=None):
    """Compute the edit from the unpatched weights and apply it to a clone of MODEL."""
    ctx = ctx or run_context()
    edit = compute_uce(ComfyText(clip, device=ctx.device), original_weights(model), model_family(model), config, ctx)
    edit.fingerprint = model_fingerprint(model)
    out_model, _, _ = apply_edit(model, None, edit)
    return out_model, edit


def export_lora(edit: Edit, path: str, config: LoraExportConfig, model=None, clip=None, ctx=None) -> dict:
    """Write `edit` as a LoRA file at `path` (masks need the MODEL/CLIP they were made for)."""
    weights = {}
    if any(c.kind == "mask" for c in edit.changes.values()):
        weights.update(original_weights(model) if model is not None else {})
        weights.update(clip_state(clip) if clip is not None else {})
    return save_lora(edit, path, config, base=weights, ctx=ctx or run_context())


class TrainHost(ComfyDenoiser):
    """ComfyDenoiser with a cache tag for the latents the training objectives generate."""

    @property
    def cache_tag(self) -> str:
        return str(model_fingerprint(self.model))


def train_host(model, clip, ctx=None, latent: tuple[int, int] | None = None) -> TrainHost:
    if model is None or clip is None:
        raise InvalidInputError("connect both the MODEL and the CLIP it came with")
    return TrainHost(model, clip, ctx=ctx or run_context(), latent_hw=latent)


def unlearn_model(model, clip, concept: str, cfg: UnlearnConfig, retain_prompts=(), ctx=None,
                  latent: tuple[int, int] | None = None):
    """Train, then apply the result to a clone. Returns (model', edit)."""
    host = train_host(model, clip, ctx, latent)
    with torch.inference_mode(False), torch.enable_grad():
        edit = compute_unlearn(host, host.text, concept, cfg, retain_prompts=list(retain_prompts),
                               family=host.family.name, ctx=host.ctx)
    edit.fingerprint = model_fingerprint(model)
    out, _, _ = apply_edit(model, None, edit)
    return out, edit


def edit_between(edited, original) -> Edit:
    """The UNet weight change from `original` to `edited` (two ComfyUI MODELs, usually clones sharing
    one module): each is loaded with its own patches and the patched keys compared."""
    import comfy.model_management as mm
    import comfy.utils
    keys = sorted(k for k in set(edited.patches) | set(original.patches) if k.startswith("diffusion_model."))
    if not keys:
        raise InvalidInputError("the edited MODEL carries no weight patches relative to the original; connect the EDIT "
                                "input instead (or the output of a ConceptEdit method node)")

    def weights(m):
        mm.load_models_gpu([m])
        return {k: comfy.utils.get_attr(m.model, k).detach().float().cpu().clone() for k in keys}

    we, wo = weights(edited), weights(original)
    changes = {k: Change("delta", tuple(wo[k].shape), {"delta": we[k] - wo[k]}) for k in keys
               if not torch.equal(we[k], wo[k])}
    if not changes:
        raise InvalidInputError("the edited MODEL's weights equal the original's; nothing to audit")
    return Edit("model-difference", model_family(original).name, changes)


def audit_models(edited, original, clip, concept_prompts, benign_prompts, cfg: AuditConfig, edit: Edit | None = None,
                 ctx=None, latent: tuple[int, int] | None = None):
    host = train_host(original, clip, ctx, latent)
    if edit is None:
        edit = edit_between(edited, original)
    edited_text = None
    if edit.text_encoder_keys():  # a text-encoder edit (EMCID)
        edited_text = ComfyText(apply_edit(original, clip, edit)[1], device=host.ctx.device)
    with torch.inference_mode(False), torch.enable_grad():
        presence = guidance_presence(host, host.text, concept_prompts, seed=cfg.seed, gen_steps=cfg.gen_steps,
                                     gen_cfg=cfg.gen_cfg, edited_text=edited_text)
        report = audit(host, edited_text or host.text, edit, presence, cfg,
                       benign_prompts=benign_prompts or DEFAULT_BENIGN, ctx=host.ctx,
                       text_is_edited=edited_text is not None)
    return report


def presence_before_after(model, edited_model, clip, vae, prompts: list[str], *, seed: int, steps: int, cfg: float,
                          n_timesteps: int, noise_draws: int, edited_clip=None,
                          ctx: RunContext | None = None,
                          latent: tuple[int, int] | None = None) -> tuple[PresenceComparison, torch.Tensor]:
    """Generate each prompt with both models (same seeds), then score concept presence on the
    original model's pictures. Returns the comparison and an image grid (row 1 original, row 2 edited)."""
    if model_family(model).name != model_family(edited_model).name:
        raise InvalidInputError("the original and the edited MODEL are different model families; "
                                "connect the model the edit was applied to as 'model'")
    ctx = ctx or RunContext()
    before = ComfyDenoiser(model, clip, ctx=ctx, latent_hw=latent)
    after = ComfyDenoiser(edited_model, edited_clip or clip, ctx=ctx, latent_hw=latent)
    lat_before = before.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    lat_after = after.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    x0 = before.latent_in(lat_before)
    n_train = len(before.alphas_cumprod())
    config = PresenceConfig(timesteps=spread_timesteps(n_timesteps, n_train), noise_draws=noise_draws, seed=seed)
    result = compare_presence(before, after, before.text, after.text, prompts, x0, config, ctx)
    grid = image_grid([vae.decode(lat_before), vae.decode(lat_after)])
    return result, grid


def distill_unlearn_models(student, teacher, clip, concept: str, cfg, distill_prompts=(), ctx=None,
                           latent: tuple[int, int] | None = None):
    """Bilevel distill-and-unlearn of a pruned `student` from `teacher` (both ComfyUI MODELs, one
    CLIP). A student made from the teacher by patches (ConceptPrune, Apply Concept Edit, a pruning
    mask) trains on the teacher's own network with that pruning held fixed; a student of its own
    (other layout or weights) trains on its network against the teacher's predictions. Returns
    (student', edit); neither input is changed."""
    from ..editing.distill import compute_distill_unlearn

    if student is None or teacher is None:
        raise InvalidInputError("connect the pruned student MODEL and the full teacher MODEL it is distilled from")
    host = train_host(teacher, clip, ctx, latent)
    student_edit, student_host = None, None
    if student.model is teacher.model:
        student_edit = edit_between(student, teacher)
    else:
        student_host = TrainHost(student, host.text, ctx=host.ctx, latent_hw=latent or host.latent_size)
        s_ctx, t_ctx = student_host.family.context_dim, host.family.context_dim
        if s_ctx != t_ctx:
            raise InvalidInputError(f"the student reads text of width {s_ctx}, the teacher {t_ctx}: both must use the "
                                    "connected CLIP")
    with torch.inference_mode(False), torch.enable_grad():
        edit = compute_distill_unlearn(host, host.text, student_edit, concept, cfg,
                                       distill_prompts=list(distill_prompts),
                                       family=(student_host or host).family.name, ctx=host.ctx,
                                       student=student_host)
    edit.fingerprint = model_fingerprint(student)
    out, _, _ = apply_edit(student, None, edit)
    return out, edit
