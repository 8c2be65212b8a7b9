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

from ..editing.arch import TINY_WORLD_FAMILIES, clip_hint
from ..editing.audit.presence import (PresenceComparison, PresenceConfig, compare_presence, concept_words,
                                      describe_baselines, image_grid, spread_timesteps)
from ..editing.audit.resurgence import DEFAULT_BENIGN, AuditConfig, audit, captions_for, guidance_presence
from ..editing.concept_prune.prune import PruneConfig, compute_concept_prune
from ..editing.distill.bilevel import DistillConfig, compute_distill_unlearn
from ..editing.edit import Change, Edit
from ..editing.emcid.stage2 import EmcidConfig, compute_emcid
from ..editing.errors import InvalidInputError
from ..editing.export.lora import LoraExportConfig, save_lora
from ..editing.hosts import RunContext, frames
from ..editing.prompts import build_pairs
from ..editing.redteam.runner import (FrozenText, RedTeamConfig, RedTeamReport, concept_free, model_presence_judge,
                                      original_pictures, red_team)
from ..editing.training import frozen_session
from ..editing.uce.closed_form import UCEConfig, compute_uce
from ..editing.uce.debias import DebiasConfig, debias_uce, presence_judge, similarity_judge
from ..editing.unlearn.trainer import UnlearnConfig, compute_unlearn
from .adapters import ComfyDenoiser, ComfyText, clip_state, original_weights, patched_weights, run_context
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


def paired_text_embeddings(clip):
    """`prompts -> [K, e]`: the CLIP's pooled, projected text embedding (what zero-shot CLIP compares with
    an image embedding). Refused when the tower has no real projection: ComfyUI drops SD1.x's
    (its checkpoints carry none; an identity stands in), so SD1.x text cannot be compared with a CLIP
    vision model; SDXL's CLIP-G keeps its own, which pairs with clip_vision_g."""
    if clip is None:
        raise InvalidInputError("connect the CLIP: its text tower scores the options for the CLIP vision judge")
    pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)[1]
    if pooled is None:
        raise InvalidInputError("this CLIP gives no pooled text embedding to compare with a CLIP vision model; "
                                "disconnect clip_vision (the model then judges by presence)")
    width = pooled.shape[-1]
    real = [m for n, m in clip.cond_stage_model.named_modules() if n.endswith("text_projection")
            and getattr(m, "weight", None) is not None and m.weight.shape[0] == width
            and not torch.equal(m.weight.float().cpu(), torch.eye(*m.weight.shape))]
    if not real:
        raise InvalidInputError("this checkpoint's text encoder has no CLIP text projection (ComfyUI drops SD1.x's), "
                                "so its text cannot be scored against a CLIP vision model: disconnect clip_vision "
                                "(the model then judges by presence) or use a model whose text tower pairs with it "
                                "(SDXL's CLIP-G with clip_vision_g)")

    def encode(prompts):
        return torch.cat([clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)[1] for p in prompts]).float()

    return encode


def concept_prune(model, clip, config: ConceptPruneJob, ctx: RunContext | None = None) -> JobResult:
    """ConceptPrune: calibration generations at the config's size, masks applied to a clone of MODEL."""
    view = ModelView(model, clip, ctx=ctx or run_context(), latent=config.latent())
    family = view.family
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
                             cache_dir=config.cache_dir, fingerprint=view.fingerprint)
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One ComfyUI image [H, W, C] in 0..1 -> [height, width, 3]: centre-cropped to the target's aspect
    ratio (nothing is stretched), then resized with antialiasing."""
    if image.ndim != 3 or image.shape[-1] < 3:
        raise InvalidInputError(f"expected an image [H, W, 3 or 4] in 0..1, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = image[top:top + ch, left:left + cw, :3].movedim(-1, 0)[None].float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].movedim(0, -1).clamp(0, 1)


def load_image_folder(folder: str, limit: int = 1000) -> tuple[list[torch.Tensor], list[str] | None]:
    """The images in `folder` (sorted by name) as [H, W, 3] tensors in 0..1, and their captions from a
    .txt of the same name beside each (the kohya convention), or None when no image has one."""
    import os

    import numpy as np
    from PIL import Image

    if not folder or not os.path.isdir(folder):
        raise InvalidInputError(f"no folder at {folder!r}: give a folder of images (.png/.jpg/.webp, a .txt caption "
                                "beside each)")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not names:
        raise InvalidInputError(f"{folder} holds no .png/.jpg/.webp/.bmp images")
    images, captions = [], []
    for n in names:
        with Image.open(os.path.join(folder, n)) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
        txt = os.path.join(folder, os.path.splitext(n)[0] + ".txt")
        captions.append(open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else None)
    if all(c is None for c in captions):
        return images, None
    missing = [n for n, c in zip(names, captions) if not c]
    if missing:
        raise InvalidInputError(f"{len(missing)} image(s) in {folder} have no caption .txt beside them (e.g. "
                                f"{missing[0]}): give every image one, or none (then the benign prompts are the captions)")
    return images, captions


def encode_images(view: ModelView, vae, images) -> torch.Tensor:
    """ComfyUI images (an IMAGE batch [B, H, W, C] or a list of [H, W, C]) -> clean latents in the UNet's
    scale at the view's picture size: fitted (`fit_image`), encoded by `vae`, then ComfyUI's own
    `process_latent_in`, where the training objectives' x₀ lives."""
    if vae is None:
        raise InvalidInputError("connect the checkpoint's VAE: it encodes the benign images")
    lh, lw = view.denoiser.latent_size
    ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else vae.downscale_ratio
    ratio = ratio if isinstance(ratio, int) else 8
    pixels = torch.stack([fit_image(im, lh * ratio, lw * ratio) for im in images])
    with torch.no_grad():
        z = vae.encode(pixels)
    if tuple(z.shape[-2:]) != (lh, lw):
        raise InvalidInputError(f"the VAE encodes {lh * ratio}×{lw * ratio} pixels to a {tuple(z.shape[-2:])} latent, "
                                f"not the model's {lh}×{lw}: connect the VAE that belongs to this checkpoint")
    return view.denoiser.latent_in(z.to(view.ctx.device)).float()


def audit_models(edited, original, clip, concept_prompts, benign_prompts, cfg: AuditConfig, edit: Edit | None = None,
                 ctx=None, latent: tuple[int, int] | None = None, *, vae=None, benign_images=None,
                 benign_folder: str = "", concept: str | None = None):
    """The resurgence audit of `edited` against `original` (its edit read off the two when not given).

    Presence is the model's own score (`guidance_presence`), each concept prompt measured against
    its concept-free twin: the concept's words are `concept` (one or more, comma-separated; "" for
    none), by default the edit's own concepts; a prompt with none of them is measured against the
    empty prompt.

    Benign data: the user's own images when given (`benign_images`, an IMAGE batch, and/or a
    `benign_folder`), captioned by `benign_prompts` (one line per image, or one for all) or by the
    folder's .txt files, encoded by `vae`; otherwise the original model's images of `benign_prompts`."""
    view = ModelView(original, clip, ctx=ctx or run_context(), latent=latent)
    host = view.denoiser
    latents, source = None, ""
    if benign_images is not None or benign_folder:
        images, captions, parts = [], [], []
        if benign_images is not None:
            images += list(benign_images)
            captions += captions_for(benign_prompts, len(benign_images))
            parts.append(f"{len(benign_images)} connected")
        if benign_folder:
            folder_images, folder_captions = load_image_folder(benign_folder)
            images += folder_images
            captions += folder_captions or captions_for(benign_prompts, len(folder_images))
            parts.append(f"{len(folder_images)} from {benign_folder}")
        if not images:
            raise InvalidInputError("the benign IMAGE input is empty")
        latents = encode_images(view, vae, images)
        benign_prompts, source = captions, f"{len(images)} user images ({' + '.join(parts)})"
    if edit is None:
        edit = edit_between(edited, original, view)
    edited_text = None
    if edit.text_encoder_keys():  # a text-encoder edit (EMCID)
        edited_text = ComfyText(view.apply(edit)[1], device=host.ctx.device)
    words = concept_words(concept, edit.concepts)
    with _training():
        presence = guidance_presence(host, host.text, concept_prompts, seed=cfg.seed, gen_steps=cfg.gen_steps,
                                     gen_cfg=cfg.gen_cfg, edited_text=edited_text, concepts=words)
        report = audit(host, edited_text or host.text, edit, presence, cfg,
                       benign_prompts=benign_prompts or DEFAULT_BENIGN, ctx=host.ctx,
                       text_is_edited=edited_text is not None, benign_latents=latents, benign_data=source)
    report.presence_measure = describe_baselines(concept_prompts, words)
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


def world_judge(concept: str, decode: Callable[[torch.Tensor], torch.Tensor], world_name: str = "tiny"):
    """The bundled world's classifier as a red-team judge: the share of pictures it labels `concept`
    (None when the concept is not one of that world's)."""
    from ..editing import worlds
    try:
        world, classifier = worlds.get(world_name), worlds.classifier(world_name)
        kind = world.kind_of(concept)
    except LookupError:  # no such world, or not one of its concepts
        return None

    def judge(x0):
        labels = classifier.predict(decode(x0))[kind]
        return sum(lab == concept for lab in labels) / max(len(labels), 1)
    return judge


def red_team_models(edited, original, clip, concept_prompts: Sequence[str], cfg: RedTeamConfig,
                    edit: Edit | None = None, edited_clip=None, concept: str = "", ctx=None,
                    latent: tuple[int, int] | None = None) -> RedTeamReport:
    """The red-team audit of `edited` against `original` (its UNet edit read off the two when `edit`
    is not given; a text-encoder edit comes from `edit` or `edited_clip`). Judges: the model-only
    presence score, and on the tiny model its classifier for `concept`."""
    import comfy.model_management as mm

    from .text_hooks import SoftComfyText
    view = ModelView(original, clip, ctx=ctx or run_context(), latent=latent)
    view.check_text_path("The Red-Team Audit's prompt attacks")
    host = view.denoiser
    if edit is None:
        edit = edit_between(edited, original, view)
    prompts = [p for p in concept_prompts if p.strip()]
    if not prompts:
        raise InvalidInputError("give at least one concept prompt to attack (one per line)")
    device = host.ctx.device
    mm.load_models_gpu([original, clip.patcher])
    text = SoftComfyText(clip, device=device, hint=clip_hint(view.family))
    edited_text = None
    if edit.text_encoder_keys():
        # the original's encodings (prompts, their concept-free twins, ""), before the edited CLIP loads
        text = FrozenText(text, prompts + [concept_free(p, concept) for p in prompts] + [""])
        clip2 = edited_clip if edited_clip is not None else view.apply(edit)[1]
        mm.load_models_gpu([clip2.patcher])
        edited_text = SoftComfyText(clip2, device=device, hint=clip_hint(view.family))
    with _training() as stack:
        stack.enter_context(frozen_session(host.unet()))
        attacked = edited_text or text
        for root in attacked.transformers():  # the soft prompts' gradients run through it
            stack.enter_context(frozen_session(root))
        x0 = original_pictures(host, text, prompts, cfg.attack, host.eps, host.ctx)
        with torch.no_grad():
            judges = {"model presence": model_presence_judge(host, text, prompts, x0[: cfg.attack.samples], concept,
                                                             ctx=RunContext(should_stop=host.ctx.should_stop))}
        if view.family.name in TINY_WORLD_FAMILIES and concept:
            base = original.model
            judge = world_judge(concept, lambda x: frames(base.process_latent_out(x))[:, :3].float().cpu())
            if judge is not None:
                judges = {"classifier": judge, **judges}
        return red_team(host, text, edit, prompts, cfg, judges, host.ctx, edited_text=edited_text, x0=x0)


def red_team_grid(report: RedTeamReport, model, vae=None) -> torch.Tensor:
    """The report's picture rows (original, edited, one per attack) as one ComfyUI IMAGE grid: decoded
    by `vae`, or without one the latents' first three channels, each row scaled to 0..1. Video-shaped
    latents (Wan, Qwen-Image: [B, C, frames, H, W], one frame drawn) give their frames as pictures."""
    out = model.model.process_latent_out

    def preview(latents):
        x = frames(latents[:, :3].float().cpu())
        lo, hi = x.amin(), x.amax()
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).movedim(1, -1)

    def decode(latents):
        img = vae.decode(latents)
        return img.reshape(-1, *img.shape[-3:])  # a video VAE's [B, frames, H, W, C]

    return image_grid([decode(out(r)) if vae is not None else preview(out(r)) for r in report.grid_rows])
