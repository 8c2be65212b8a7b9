"""The erasure benchmark (`editing.benchmark`) on ComfyUI's MODEL/CLIP: the generator (ComfyUI's
own sampler, each picture from the noise a batch of one draws with its seed, so a picture does not
depend on what it is batched with) and the judges' model parts per side."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..editing.arch import TINY_WORLD_FAMILIES
from ..editing.benchmark.cache import ResultCache
from ..editing.benchmark.judges import JudgeContext, build_judge, parse_judges
from ..editing.benchmark.prompts import PromptCase
from ..editing.benchmark.runner import BenchmarkReport, Settings, Side, run_benchmark
from ..editing.diffusion import sampling_cfg
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext, frames
from .adapters import _is_inpaint, run_context
from .view import ModelView


def comfy_generator(view: ModelView, settings: Settings, negative: str = "", ctx: RunContext | None = None):
    """``generate(prompts, seeds, cfg) -> latents`` as ComfyUI's sampler returns them (VAE scale)."""
    import comfy.sample
    host = view.denoiser
    ctx = ctx or view.ctx

    def generate(prompts: Sequence[str], seeds: Sequence[int], cfg: float) -> torch.Tensor:
        n = len(prompts)
        one = torch.zeros(1, host.latent_channels, *host.latent_size)
        fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
        one = fix(host.model, one) if fix is not None else one
        noise = torch.cat([comfy.sample.prepare_noise(one, int(s)) for s in seeds])
        latent = torch.zeros_like(noise)
        positive = host.text.conditioning(list(prompts))
        negative_c = host.text.conditioning([negative] * n)
        mask = torch.ones(n, 1, *latent.shape[2:]) if _is_inpaint(host.model.model) else None
        return comfy.sample.sample(host.model, noise, settings.steps, sampling_cfg(host, cfg), settings.sampler,
                                   settings.scheduler, positive, negative_c, latent, denoise=1.0, noise_mask=mask,
                                   callback=lambda *a: ctx.check(), disable_pbar=True, seed=int(seeds[0]))
    return generate


def tiny_pictures(x: torch.Tensor) -> torch.Tensor:
    """The tiny models' sampled latents -> their pictures [B, 3, H, W] in [-1, 1]: their latents are
    pixels (RGB and a zero channel, scale 1), as the tiny VAE decodes them."""
    return frames(x)[:, :3].float().cpu().clamp(-1, 1)


def benchmark_models(model, clip, edited_model, edited_clip, cases: Sequence[PromptCase], settings: Settings,
                     judges: str | Sequence[str], *, edit_key: str, erased: Sequence[str] = (),
                     cache: ResultCache | None = None, ctx: RunContext | None = None, negative: str = "",
                     judge_options: dict | None = None, info: dict | None = None,
                     count=None) -> BenchmarkReport:
    """Run the benchmark on an original MODEL/CLIP and its edited clones. `edit_key` names the edit
    in the cache (`cache.edit_fingerprint`); `count(side, n)` is told of every generator call."""
    ctx = ctx or run_context()
    names = parse_judges(judges)
    views = {"original": ModelView(model, clip, ctx=ctx), "edited": ModelView(edited_model, edited_clip or clip, ctx=ctx)}
    if views["original"].family.name != views["edited"].family.name:
        raise InvalidInputError("the original and the edited MODEL are different model families; connect the model "
                                "the edit was applied to as the original")
    fp = views["original"].fingerprint
    settings = replace(settings, extra={**settings.extra, "latent": list(views["original"].denoiser.latent_size),
                      "negative": negative, "family": fp.get("family", "")})
    sides = {}
    for name, view in views.items():
        host = view.denoiser
        world = "tiny" if view.family.name in TINY_WORLD_FAMILIES else None
        jc = JudgeContext(decode=tiny_pictures if world else None, denoiser=host, text=host.text,
                          latent_in=host.latent_in, world=world, should_stop=ctx.should_stop,
                          options=judge_options or {})
        gen = comfy_generator(view, settings, negative, ctx)
        if count is not None:
            gen = _counted(gen, name, count)
        sides[name] = Side(model=fp, edit="original" if name == "original" else edit_key, generate=gen,
                           judges=[build_judge(n, jc) for n in names])
    return run_benchmark(cases, sides["original"], sides["edited"], settings, erased, cache, ctx, info)


def _counted(gen, name, count):
    def generate(prompts, seeds, cfg):
        count(name, len(prompts))
        return gen(prompts, seeds, cfg)
    return generate
