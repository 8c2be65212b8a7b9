"""The jobs the nodes, the command line and the benches share: a library method run on ComfyUI's
MODEL/CLIP, its result applied to a clone (the input is never changed).

Every method has one signature, ``job(model, clip, config, ctx=None) -> JobResult(model', clip',
edit, warnings)``: `config` is the method's job config (what to edit, the method's own typed config
as `settings`, and the strength and picture size every job takes), `ctx` the progress/Cancel context (default:
ComfyUI's progress bar and Cancel button). Each job builds one `view.ModelView` of its input and
hands its parts (layout, base weights, text encoder, denoiser) to the library. `JOBS` lists them.

Kept out of `nodes/` so that `cli/` and `bench/` do not import node classes, and out of `editing/`
because it speaks ComfyUI.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from ..editing.audit.presence import PresenceComparison, PresenceConfig, compare_presence, image_grid, spread_timesteps
from ..editing.audit.resurgence import DEFAULT_BENIGN, AuditConfig, audit, guidance_presence
from ..editing.concept_prune.prune import PruneConfig, compute_concept_prune
from ..editing.distill.bilevel import DistillConfig, compute_distill_unlearn
from ..editing.edit import Change, Edit
from ..editing.emcid.stage2 import EmcidConfig, compute_emcid
from ..editing.errors import InvalidInputError
from ..editing.export.lora import LoraExportConfig, save_lora
from ..editing.hosts import RunContext
from ..editing.prompts import build_pairs
from ..editing.training import frozen_session
from ..editing.uce.closed_form import UCEConfig, compute_uce
from ..editing.unlearn.trainer import UnlearnConfig, compute_unlearn
from .adapters import ComfyText, clip_state, original_weights, patched_weights, run_context
from .view import ModelView

log = logging.getLogger(__name__)


def latent_size(width: int = 0, height: int = 0) -> tuple[int, int] | None:
    """Pixels (a node's width/height, 0 = the model's native size) -> latent (height, width) cells."""
    if not width and not height:
        return None
    if min(width, height) < 8:
        raise InvalidInputError(f"give both width and height of at least 8 pixels (or 0 for the model's native size), "
                                f"got {width}×{height}")
    return height // 8, width // 8


class JobResult(NamedTuple):
    model: Any       # the edited clone of MODEL (MODEL itself when the edit has no UNet key)
    clip: Any        # the edited clone of CLIP (CLIP itself when the edit has no text-encoder key)
    edit: Edit
    warnings: list


@dataclass(kw_only=True)
class Job:
    """What every job takes besides its method's config: how much of the edit goes onto the clone,
    and the picture size the methods that generate work at (0 = the model's native size)."""
    strength: float = 1.0
    width: int = 0
    height: int = 0

    def latent(self) -> tuple[int, int] | None:
        return latent_size(self.width, self.height)


@dataclass(kw_only=True)
class UCEJob(Job):
    settings: UCEConfig  # the concepts, guides and preserve set are part of UCE's own config


@dataclass(kw_only=True)
class ConceptPruneJob(Job):
    concepts: Sequence[str]
    preset: str = "tiny"
    pairs_text: str = ""         # the user's own "concept prompt | reference prompt" lines
    settings: PruneConfig = field(default_factory=PruneConfig)


@dataclass(kw_only=True)
class EmcidJob(Job):
    pairs: Sequence[tuple[str, str]]
    settings: EmcidConfig = field(default_factory=EmcidConfig)
    cache_dir: str | None = None  # C₀ and stage-1 targets between runs


@dataclass(kw_only=True)
class UnlearnJob(Job):
    concept: str
    settings: UnlearnConfig = field(default_factory=UnlearnConfig)
    retain_prompts: Sequence[str] = ()


@dataclass(kw_only=True)
class DistillJob(Job):
    """MODEL is the pruned student; `teacher` the full model it is distilled from (same CLIP)."""
    teacher: Any
    concept: str = ""            # empty: distillation only
    settings: DistillConfig = field(default_factory=DistillConfig)
    distill_prompts: Sequence[str] = ()


def _finish(view: ModelView, edit: Edit, config: Job) -> JobResult:
    view.stamp(edit)
    model, clip, warnings = view.apply(edit, config.strength)
    return JobResult(model, clip, edit, warnings)


def _training():
    """What a training job runs under inside ComfyUI's `torch.inference_mode()` executor."""
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def uce(model, clip, config: UCEJob, ctx: RunContext | None = None) -> JobResult:
    """UCE from the unpatched weights, applied to a clone of MODEL."""
    view = ModelView(model, clip, ctx=ctx or run_context())
    edit = compute_uce(view.text, view.weights, view.family, config.settings, view.ctx)
    return _finish(view, edit, config)


def concept_prune(model, clip, config: ConceptPruneJob, ctx: RunContext | None = None) -> JobResult:
    """ConceptPrune: calibration generations at the config's size, masks applied to a clone of MODEL."""
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    family = view.family  # a clear error for a model without cross-attention, before any prompt is built
    pairs = build_pairs(list(config.concepts), config.preset, config.pairs_text)
    edit = compute_concept_prune(view.denoiser, family, pairs, config.settings, view.ctx, fingerprint=view.fingerprint)
    return _finish(view, edit, config)


def emcid(model, clip, config: EmcidJob, ctx: RunContext | None = None) -> JobResult:
    """EMCID on the CLIP (stage 1 runs MODEL): both loaded, their weights made usable for autograd
    for the duration, the edit applied to a clone of CLIP."""
    import comfy.model_management as mm

    from .text_hooks import ComfyTextModel

    if clip is None:
        raise InvalidInputError("connect the CLIP to edit")
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    cfg = config.settings
    family = view.family  # the text encoders read from this CLIP
    text = ComfyTextModel(clip, device=mm.get_torch_device())
    denoiser = view.denoiser if cfg.use_stage1 else None
    # load (and patch) first: ComfyUI must never patch the plain copies frozen_session swaps in
    mm.load_models_gpu([model, clip.patcher] if cfg.use_stage1 else [clip.patcher])
    roots = text.transformers() + ([model.model.diffusion_model] if cfg.use_stage1 else [])
    with _training() as stack:
        for root in roots:
            stack.enter_context(frozen_session(root))
        edit = compute_emcid(text, family, list(config.pairs), cfg, view.ctx, denoiser=denoiser,
                             cache_dir=config.cache_dir, fingerprint=view.fingerprint)
    return _finish(view, edit, config)


def unlearn(model, clip, config: UnlearnJob, ctx: RunContext | None = None) -> JobResult:
    """RGD / GA / ESD: adapters trained on the frozen MODEL, the result applied to a clone."""
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    host = view.denoiser
    with _training():
        edit = compute_unlearn(host, host.text, config.concept, config.settings, retain_prompts=list(config.retain_prompts),
                               family=view.family.name, ctx=view.ctx)
    return _finish(view, edit, config)


def distill_unlearn(model, clip, config: DistillJob, ctx: RunContext | None = None) -> JobResult:
    """Bilevel distill-and-unlearn of the pruned student MODEL from `config.teacher` (one CLIP). A student
    made from the teacher by patches (ConceptPrune, Apply Concept Edit, a pruning mask) trains on the
    teacher's own network with that pruning held fixed; a student of its own (other layout or
    weights) trains on its network against the teacher's predictions. Neither input is changed."""
    student, teacher = model, config.teacher
    if student is None or teacher is None:
        raise InvalidInputError("connect the pruned student MODEL and the full teacher MODEL it is distilled from")
    ctx = ctx or run_context()
    t_view = ModelView(teacher, clip, ctx=ctx, latent=config.latent())
    s_view = ModelView(student, clip, ctx=ctx, latent=config.latent() or t_view.denoiser.latent_size)
    host = t_view.denoiser
    student_edit, student_host = None, None
    if student.model is teacher.model:
        student_edit = edit_between(student, teacher, t_view)
    else:
        student_host = s_view.denoiser
        s_ctx, t_ctx = s_view.family.context_dim, t_view.family.context_dim
        if s_ctx != t_ctx:
            raise InvalidInputError(f"the student reads text of width {s_ctx}, the teacher {t_ctx}: both must use the "
                                    "connected CLIP")
    with _training():
        edit = compute_distill_unlearn(host, host.text, student_edit, config.concept, config.settings,
                                       distill_prompts=list(config.distill_prompts), family=s_view.family.name,
                                       ctx=ctx, student=student_host)
    return _finish(s_view, edit, config)


# Every method job: name -> (its config type, the job). Nodes, the command line and the benches run
# a method through here or through the function itself; both take the same arguments.
JOBS: dict[str, tuple[type, Callable[..., JobResult]]] = {
    "uce": (UCEJob, uce),
    "concept_prune": (ConceptPruneJob, concept_prune),
    "emcid": (EmcidJob, emcid),
    "unlearn": (UnlearnJob, unlearn),
    "distill_unlearn": (DistillJob, distill_unlearn),
}


def run(method: str, model, clip, config: Job, ctx: RunContext | None = None) -> JobResult:
    """Run the method job `method` (a key of `JOBS`) with its job config."""
    if method not in JOBS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(JOBS)}")
    kind, fn = JOBS[method]
    if not isinstance(config, kind):
        raise InvalidInputError(f"the {method} job takes a {kind.__name__}, not a {type(config).__name__}")
    return fn(model, clip, config, ctx)


def export_lora(edit: Edit, path: str, config: LoraExportConfig, model=None, clip=None, ctx=None) -> dict:
    """Write `edit` as a LoRA file at `path` (masks need the MODEL/CLIP they were made for)."""
    weights = {}
    if any(c.kind == "mask" for c in edit.changes.values()):
        weights.update(original_weights(model) if model is not None else {})
        weights.update(clip_state(clip) if clip is not None else {})
    return save_lora(edit, path, config, base=weights, ctx=ctx or run_context())


def edit_between(edited, original, view: ModelView | None = None) -> Edit:
    """The UNet weight change from `original` to `edited` (two ComfyUI MODELs, usually clones sharing
    one module): each one's unpatched weights plus its own patches, by ComfyUI's patch arithmetic
    (`adapters.patched_weights`), so it does not matter what either has loaded, fully or in low-VRAM mode.
    `view`: the caller's view of `original`, whose layout and weights are then not read again."""
    keys = sorted(k for k in set(edited.patches) | set(original.patches) if k.startswith("diffusion_model."))
    if not keys:
        raise InvalidInputError("the edited MODEL carries no weight patches relative to the original; connect the EDIT "
                                "input instead (or the output of a ConceptEdit method node)")
    view = view or ModelView(original)
    we, wo = patched_weights(edited, keys), patched_weights(original, keys, base=view.weights)
    changes = {k: Change("delta", tuple(wo[k].shape), {"delta": we[k] - wo[k]}) for k in keys
               if not torch.equal(we[k], wo[k])}
    if not changes:
        raise InvalidInputError("the edited MODEL's weights equal the original's; nothing to audit")
    return Edit("model-difference", view.family.name, changes)


def audit_models(edited, original, clip, concept_prompts, benign_prompts, cfg: AuditConfig, edit: Edit | None = None,
                 ctx=None, latent: tuple[int, int] | None = None):
    """The resurgence audit of `edited` against `original` (its edit read off the two when not given)."""
    view = ModelView(original, clip, ctx=ctx or run_context(), latent=latent)
    host = view.denoiser
    if edit is None:
        edit = edit_between(edited, original, view)
    edited_text = None
    if edit.text_encoder_keys():  # a text-encoder edit (EMCID)
        edited_text = ComfyText(view.apply(edit)[1], device=host.ctx.device)
    with _training():
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
    ctx = ctx or run_context()
    before_view = ModelView(model, clip, ctx=ctx, latent=latent)
    after_view = ModelView(edited_model, edited_clip or clip, ctx=ctx, latent=latent)
    if before_view.family.name != after_view.family.name:
        raise InvalidInputError("the original and the edited MODEL are different model families; "
                                "connect the model the edit was applied to as 'model'")
    before, after = before_view.denoiser, after_view.denoiser
    lat_before = before.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    lat_after = after.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    x0 = before.latent_in(lat_before)
    n_train = len(before.alphas_cumprod())
    config = PresenceConfig(timesteps=spread_timesteps(n_timesteps, n_train), noise_draws=noise_draws, seed=seed)
    result = compare_presence(before, after, before.text, after.text, prompts, x0, config, ctx)
    grid = image_grid([vae.decode(lat_before), vae.decode(lat_after)])
    return result, grid
