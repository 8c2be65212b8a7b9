"""The audits on ComfyUI MODELs: resurgence under benign fine-tuning (`audit_models`), the red team
(`red_team_models`, `red_team_grid`) and presence before/after (`presence_before_after`). Each reads
the edit off the two models when it is not given (`jobs.edit_between`); neither model is changed."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..editing.arch import TINY_WORLD_FAMILIES, clip_hint
from ..editing.audit.presence import (PresenceComparison, PresenceConfig, compare_presence, concept_words,
                                      describe_baselines, image_grid, spread_timesteps)
from ..editing.audit.resurgence import DEFAULT_BENIGN, AuditConfig, audit, captions_for, guidance_presence
from ..editing.edit import Edit
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext, frames
from ..editing.redteam.runner import (FrozenText, RedTeamConfig, RedTeamReport, concept_free, model_presence_judge,
                                      original_pictures, red_team)
from ..editing.training import frozen_session
from .images import encode_images, load_image_folder
from .view import ModelView, edit_between, training_mode
from .progress import run_context
from .text import ComfyText


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
    with training_mode():
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
                    latent: tuple[int, int] | None = None, shard: bool = True) -> RedTeamReport:
    """The red-team audit of `edited` against `original` (its UNet edit read off the two when `edit`
    is not given; a text-encoder edit comes from `edit` or `edited_clip`). Judges: the model-only
    presence score, and on the tiny model its classifier for `concept`. Under torchrun the attacks
    (and revival fractions) are split over the processes (`red_team`); `shard=False` runs them all
    here, for a caller that splits the work itself."""
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
    with training_mode() as stack:
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
        return red_team(host, text, edit, prompts, cfg, judges, host.ctx, edited_text=edited_text, x0=x0,
                        shard=shard)


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
