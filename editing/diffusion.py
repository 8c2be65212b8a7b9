"""The diffusion formulas every method shares, written once: forward noising at DDPM timesteps,
the ε-MSE loss, DDIM sampling through `Trainable.eps`, and the clean latents a model generates for
a prompt set (what the trainers, the audit and presence train or measure on).

Convention: x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε with ᾱ from `Trainable.alphas_cumprod()`,
integer t in [0, len(ᾱ)); hosts convert their own prediction type to ε (`Trainable.eps`).
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .hosts import RunContext, Text, Trainable, cat_y, conditioning, latent_shape


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t shaped to broadcast over `like` ([B, C, H, W]; a scalar t gives one value for the batch)."""
    a = alphas_cumprod[t] if isinstance(t, int) else alphas_cumprod[t.to(alphas_cumprod.device).long()]
    a = a.to(device=like.device, dtype=torch.float32)
    return a.view(-1, *([1] * (like.ndim - 1))) if a.ndim else a


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε."""
    a = alpha_bar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(xt: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x₀ = (x_t − √(1 − ᾱ)·ε) / √ᾱ: the clean latent an ε-prediction implies."""
    return (xt - (1 - a).sqrt() * eps) / a.sqrt()


def objective_weights(host, t: torch.Tensor) -> torch.Tensor | None:
    """Per-row weights w_t that turn an ε-MSE at timesteps `t` into the MSE of the model's own
    training objective (``Trainable.loss_weight``, optional; None: the ε-MSE as it is).

    Why: on a rectified-flow model (Flux, SD3) the ε an x₀ change implies shrinks with the noise
    level (ε̂ − ε = (1 − σ_f)/σ_f · (x₀ − x̂₀)), so at the high noise levels where such a model lays
    out colour and composition an ε-loss sees almost nothing; its velocity loss ‖v̂ − v‖² =
    ‖ε̂ − ε‖² / (1 − σ_f)² sees them as the model was trained to."""
    get = getattr(host, "loss_weight", None)
    return None if get is None else get(t)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The per-row MSE weighted by `weights` ([B], or one weight for all rows) and averaged (None: the plain MSE)."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_row * weights.to(per_row.device, per_row.dtype).reshape(-1).expand(per_row.shape[0])).mean()


def objective_mse(host, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE of ε-predictions `pred` against `target` at timesteps `t`, weighted per row by
    `objective_weights` (the plain ε-MSE where the host gives none)."""
    return weighted_mse(pred, target, objective_weights(host, t))


def diffusion_mse(host: Trainable, x0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor, ac: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """‖ε_θ(x_t, t, c) − ε‖² at x_t = `add_noise(x0, noise, t)` (`y`: the vector conditioning for
    `context`), weighted to the model's own objective (`objective_mse`: velocity on flow models)."""
    return objective_mse(host, host.eps(add_noise(x0, noise, t, ac), t, context, y=y), noise, t)


def ddim_timesteps(n_train: int, steps: int) -> torch.Tensor:
    """The `steps` integer timesteps `ddim_sample` visits, from n_train − 1 down to 0."""
    return torch.linspace(n_train - 1, 0, steps).round().long()


def plms_timesteps(steps: int, n_train: int = 1000, offset: int = 1) -> list[int]:
    """The timesteps diffusers' PNDMScheduler evaluates with SD1.x's scheduler config (skip_prk_steps,
    "leading" spacing, steps_offset 1): i·⌊n_train/steps⌋ + 1 for i = steps−1 … 0, the second one
    twice (PLMS's warm-up evaluates it again). 50 steps: 981, 961, 961, 941, …, 21, 1."""
    stride = n_train // steps
    if stride < 1:
        raise InvalidInputError(f"the official PNDM schedule needs steps <= {n_train} (the model's timesteps), "
                                f"got {steps}")
    up = [i * stride + offset for i in range(steps)]
    return (up[:-1] + up[-2:-1] + up[-1:])[::-1]


def sampling_cfg(host, cfg: float) -> float:
    """The classifier-free guidance scale `host` samples at when `cfg` is asked for: 1, the
    conditional prediction alone, on a guidance-distilled model (``host.guidance_distilled``:
    Flux-dev, whose guidance embedding does the guiding, as ComfyUI users run it at CFG 1), where
    CFG on top draws over-guided pictures at twice the cost; `cfg` on every other model."""
    return 1.0 if getattr(host, "guidance_distilled", False) else float(cfg)


def ddim_sample(host: Trainable, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int, cfg: float, seed: int,
                shape: tuple[int, ...] | None = None, ctx: RunContext | None = None,
                y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None,
                stop: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance through `host.eps` (for hosts without a sampler).

    `stop`: take only the first `stop` of the `steps` steps and return the partly denoised latent,
    which then sits at timestep ``ddim_timesteps(len(ᾱ), steps)[stop]`` (ESD's x_t); None = down to x₀.
    A guidance-distilled host samples at `sampling_cfg` 1 and never reads `uncond`."""
    ac = host.alphas_cumprod().float()
    cfg = sampling_cfg(host, cfg)
    if stop is not None and not 0 <= stop < steps:
        raise ValueError(f"stop must be in [0, {steps}) for {steps} DDIM steps, not {stop}")
    if shape is None:
        shape = (cond.shape[0], *latent_shape(host))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(cond.device)
    ts = ddim_timesteps(len(ac), steps)
    for i, t in enumerate(ts):
        if stop is not None and i == stop:
            break
        if ctx is not None:
            ctx.check()
        a = ac[t].to(x.device)
        tt = torch.full((x.shape[0],), int(t), device=x.device)
        if cfg == 1.0:
            e = host.eps(x, tt, cond, y=y)
        else:
            e = host.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond]), y=cat_y(y, y_uncond))
            ec, eu = e.chunk(2)
            e = eu + cfg * (ec - eu)
        x0 = predict_x0(x, e, a)
        a_prev = ac[ts[i + 1]].to(x.device) if i + 1 < len(ts) else torch.tensor(1.0, device=x.device)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x


def generate_latents(host, text: Text, prompts: Sequence[str], *, steps: int, cfg: float, seed: int,
                     cache_dir: str | None = None, ctx: RunContext | None = None) -> torch.Tensor:
    """Clean latents x₀ (in the UNet's scale) that the model generates for each prompt.

    Uses the host's sampler (`Denoiser.sample`, then `latent_in` if the host has it) and falls back on
    a deterministic DDIM with `Trainable.eps`. Cached as safetensors in `cache_dir` when given."""
    path = None
    if cache_dir:
        tag = hashlib.sha256(repr((list(prompts), steps, cfg, seed, getattr(host, "cache_tag", ""))).encode()).hexdigest()[:16]
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"latents_{tag}.safetensors")
        if os.path.isfile(path):
            from safetensors.torch import load_file
            return load_file(path)["x0"]
    with torch.no_grad():
        if hasattr(host, "sample"):
            x0 = host.sample(list(prompts), steps=steps, cfg=cfg, seed=seed)
            if hasattr(host, "latent_in"):
                x0 = host.latent_in(x0)
        else:
            cond, y = conditioning(host, text, prompts)
            uncond, y_uncond = conditioning(host, text, [""] * len(prompts))
            x0 = ddim_sample(host, cond, uncond, steps=steps, cfg=cfg, seed=seed, ctx=ctx, y=y, y_uncond=y_uncond)
    x0 = x0.detach().float().clone()
    if path:
        from safetensors.torch import save_file
        save_file({"x0": x0.cpu().contiguous()}, path)
    return x0
