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
from collections import ChainMap
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ..editing.arch import clip_hint
from ..editing.concept_prune.prune import PruneConfig, compute_concept_prune
from ..editing.distill.bilevel import DistillConfig, compute_distill_unlearn
from ..editing.edit import Change, Edit
from ..editing.emcid import EmcidConfig, compute_emcid
from ..editing.errors import InvalidInputError
from ..editing.export.lora import LoraExportConfig, save_lora
from ..editing.hosts import PhaseRate, RunContext, time_left_text
from ..editing.prompts import build_pairs
from ..editing.training import frozen_session
from ..editing.uce.closed_form import UCEConfig, compute_uce
from ..editing.uce.debias import DebiasConfig, debias_uce, presence_judge, similarity_judge
from ..editing.unlearn.trainer import UnlearnConfig, compute_unlearn
from .denoiser import ComfyDenoiser
from .patches import clip_state, original_weights, patched_weights
from .progress import run_context
from .text import ComfyText
from .clip_judge import paired_text_embeddings
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
    """UCE's job. With `loop` (mode "debias") the debias edit is closed-loop (`editing.uce.debias`):
    `judge` is a ComfyUI CLIP_VISION (then `vae` decodes the pictures for it, and the CLIP's text
    tower must pair with it), a callable ``judge(latents, options, concept) -> scores [N, K]``
    (latents as ComfyUI's sampler returns them), or None: the unedited MODEL judges by presence,
    on latents (no VAE)."""
    settings: UCEConfig  # the concepts, guides and preserve set are part of UCE's own config
    loop: DebiasConfig | None = None  # None: the single static solve
    judge: Any = None
    vae: Any = None
    judge_template: str = "This is a photo of {}."  # a CLIP judge's text per option (the official pipeline's)


@dataclass(kw_only=True)
class ConceptPruneJob(Job):
    concepts: Sequence[str]
    preset: str = "tiny"
    pairs_text: str = ""         # the user's own "concept prompt | reference prompt" lines
    settings: PruneConfig = field(default_factory=PruneConfig)
    cache_dir: str | None = None  # each batch's calibration statistics as it finishes (a stopped run resumes)


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
    return JobResult(model, clip, edit, list(edit.metrics.get("warnings", ())) + list(warnings))


def _training(*load):
    """What a training job runs under inside ComfyUI's `torch.inference_mode()` executor. The MODELs
    in `load` are loaded first, still in inference mode as ComfyUI loads them: loaded outside it,
    ComfyUI's QuantizedTensor weights are swapped for non-inference ones, which its own state dict
    then fails to read under inference mode."""
    if load:
        import comfy.model_management as mm
        mm.load_models_gpu(list(load))
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def progress_text(text: str) -> None:
    """`text` under the running node (ComfyUI's progress text), or the log outside a ComfyUI run."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        running = get_executing_context()
        server = PromptServer.instance
    except (ImportError, AttributeError):  # ComfyUI before progress texts, or headless
        running = server = None
    if running is None or server is None or not hasattr(server, "send_progress_text"):
        log.debug("%s", text)
        return
    server.send_progress_text(text, running.node_id)


def eta_text(what: str, done: int, total: int, seconds: float, start: int, concepts: Mapping | None = None) -> str:
    """'EMCID: 12/1000 concepts, about 3 min left': the work done and the time left at the rate since
    `start` (what was done before it, e.g. taken from the cache, does not count toward the rate)."""
    part = (f"{concepts['done']}/{concepts['total']} concepts" if concepts and concepts.get("total")
            else f"{100 * done // max(total, 1)} %")
    rate = (done - start) / seconds if seconds > 0 else 0.0
    if done >= total or rate <= 0:
        return f"{what}: {part}"
    return f"{what}: {part}, about {time_left_text((total - done) / rate)} left"


def with_eta(ctx: RunContext, what: str, concepts: Mapping | None = None, every: float = 1.0) -> RunContext:
    """`ctx` whose progress also shows `eta_text` under the node (at most every `every` seconds), per
    phase (`PhaseRate`). `concepts`: a dict the job keeps up to date with stage 1's {"done", "total"}
    concepts."""
    import dataclasses

    inner = ctx.progress
    phase = PhaseRate()
    shown = {"at": None, "total": None}

    def progress(done: int, total: int) -> None:
        if inner is not None:
            inner(done, total)
        elapsed = phase.update(done, total)
        now = phase.clock()
        if shown["total"] != total or shown["at"] is None or now - shown["at"] >= every or done >= total:
            shown.update(at=now, total=total)
            # stage 1 names its concepts before each report (`fresh`); the other phases show a share
            in_stage1 = dict(concepts) if concepts is not None and concepts.pop("fresh", False) else None
            progress_text(eta_text(what, done, total, elapsed, phase.start, in_stage1))

    return dataclasses.replace(ctx, progress=progress)


def uce(model, clip, config: UCEJob, ctx: RunContext | None = None) -> JobResult:
    """UCE from the unpatched weights, applied to a clone of MODEL (closed-loop debias with `config.loop`)."""
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    if config.loop is not None:
        edit = _uce_debias(view, config)
    else:
        edit = compute_uce(view.text, view.weights, view.family, config.settings, view.ctx, norms=view.text_norms)
    return _finish(view, edit, config)


def _uce_debias(view: ModelView, config: UCEJob) -> Edit:
    """Each round's edit goes onto a clone that generates the concepts at the job's size, the judge
    reads the shares, the next round re-solves from the unpatched weights."""
    loop = config.loop
    view.check_clip()
    quiet = RunContext(should_stop=view.ctx.should_stop, device=view.ctx.device)  # the loop reports rounds
    text = _EncodedOnce(view.clip, device=view.ctx.device)  # UCE leaves the CLIP alone: encode each prompt once
    host = ComfyDenoiser(view.model, text, ctx=quiet, latent_hw=view.latent, family=view.family,
                         base=lambda: view.weights)

    def generate(edit, prompts, seed):
        sampler = host
        if edit is not None:
            sampler = ComfyDenoiser(view.apply(edit)[0], text, ctx=quiet, latent_hw=host.latent_size,
                                    family=view.family, base=lambda: view.weights)
        return sampler.sample(list(prompts), steps=loop.steps, cfg=loop.cfg, seed=seed)

    return debias_uce(text, view.weights, view.family, config.settings, loop, generate,
                      _debias_judge(view, config, host, quiet), view.ctx, norms=view.text_norms)


class _EncodedOnce(ComfyText):
    """ComfyText that encodes each distinct prompt once (its context, pooled vector and the CLIP's other
    outputs, `ComfyText._encode_one`): every round generates the same prompts N times over, and the
    text encoder is the same in every round."""

    def __init__(self, clip, device=None):
        super().__init__(clip, device=device)
        self._memo: dict[str, tuple] = {}

    def _encode_one(self, prompt: str):
        if prompt not in self._memo:
            self._memo[prompt] = super()._encode_one(prompt)
        return self._memo[prompt]


def _debias_judge(view: ModelView, config: UCEJob, host: ComfyDenoiser, ctx: RunContext):
    judge = config.judge
    if judge is None:  # the unedited MODEL as a diffusion classifier, on latents
        return presence_judge(host, host.text, to_x0=host.latent_in, ctx=ctx)
    if not hasattr(judge, "encode_image"):
        if callable(judge):
            return judge
        raise InvalidInputError(f"the debias judge must be a CLIP_VISION model, not {type(judge).__name__}")
    if config.vae is None:
        raise InvalidInputError("a CLIP vision judge looks at pictures: connect the checkpoint's VAE too")
    vae = config.vae
    return similarity_judge(lambda latents: judge.encode_image(vae.decode(latents)).image_embeds,
                            paired_text_embeddings(view.clip), config.judge_template)


def concept_prune(model, clip, config: ConceptPruneJob, ctx: RunContext | None = None) -> JobResult:
    """ConceptPrune: calibration generations at the config's size, masks applied to a clone of MODEL."""
    view = ModelView(model, clip, ctx=ctx or with_eta(run_context(), "ConceptPrune calibration"), latent=config.latent())
    family = view.family
    pairs = build_pairs(list(config.concepts), config.preset, config.pairs_text)
    edit = compute_concept_prune(view.denoiser, family, pairs, config.settings, view.ctx, fingerprint=view.fingerprint,
                                 cache_dir=config.cache_dir)
    return _finish(view, edit, config)


def emcid(model, clip, config: EmcidJob, ctx: RunContext | None = None) -> JobResult:
    """EMCID on the CLIP (stage 1 runs MODEL): both loaded, their weights made usable for autograd
    for the duration, the edit applied to a clone of CLIP."""
    import comfy.model_management as mm

    from .text_hooks import ComfyTextModel

    if clip is None:
        raise InvalidInputError("connect the CLIP to edit")
    concepts = {}  # stage 1's (done, total) concepts, for the progress text
    view = ModelView(model, clip, ctx=ctx or with_eta(run_context(), "EMCID", concepts), latent=config.latent())
    cfg = config.settings
    family = view.family  # the text encoders read from this CLIP
    view.check_text_path("The Text Encoder Edit (EMCID)")
    view.check_clip()
    text = ComfyTextModel(clip, device=mm.get_torch_device(), hint=clip_hint(family))
    why = text.emcid_refusal()
    if why:
        raise InvalidInputError(f"The Text Encoder Edit (EMCID) cannot edit this {family.label}: {why}. Use "
                                f"{view.alternatives()} on this model instead (the Red-Team Audit's prompt attacks "
                                "do run on its text encoder)")
    denoiser = view.denoiser if cfg.runs_stage1 else None
    # load (and patch) first: ComfyUI must never patch the plain copies frozen_session swaps in
    mm.load_models_gpu([model, clip.patcher] if cfg.runs_stage1 else [clip.patcher])
    roots = text.transformers() + ([model.model.diffusion_model] if cfg.runs_stage1 else [])
    with _training() as stack:
        for root in roots:
            stack.enter_context(frozen_session(root))
        edit = compute_emcid(text, family, list(config.pairs), cfg, view.ctx, denoiser=denoiser,
                             cache_dir=config.cache_dir, fingerprint=view.fingerprint,
                             on_concepts=lambda done, total: concepts.update(done=done, total=total, fresh=True))
    return _finish(view, edit, config)


def unlearn(model, clip, config: UnlearnJob, ctx: RunContext | None = None) -> JobResult:
    """RGD / GA / ESD: adapters trained on the frozen MODEL, the result applied to a clone."""
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    host = view.denoiser
    with _training(model):
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
    s_view = ModelView(student, clip, ctx=ctx, latent=config.latent() or t_view.cells8())
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
    config.validate()  # before any base weight is read
    weights: Mapping[str, torch.Tensor] = {}
    if any(c.kind == "mask" for c in edit.changes.values()):
        # chained, not merged: a quantized model's weights are dequantized only where a mask reads them
        weights = ChainMap(*[w for w in (clip_state(clip) if clip is not None else None,
                                         original_weights(model) if model is not None else None) if w is not None])
    return save_lora(edit, path, config, base=weights, ctx=ctx or run_context())


def edit_between(edited, original, view: ModelView | None = None) -> Edit:
    """The UNet weight change from `original` to `edited` (two ComfyUI MODELs, usually clones sharing
    one module): each one's unpatched weights plus its own patches, by ComfyUI's patch arithmetic
    (`patches.patched_weights`), so it does not matter what either has loaded, fully or in low-VRAM mode.
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


