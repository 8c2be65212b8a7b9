"""What the library needs from a host (ComfyUI, the headless CLI, diffusers, tests).

The algorithms never import a host. They receive these small objects, so the same code serves
ComfyUI nodes, the command line and the tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from .errors import Cancelled


class TextEncoder(Protocol):
    """Turns prompts into the context the UNet's cross-attention reads."""

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77, d] text embeddings (the UNet's `context`), on the compute device."""

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of the prompt *including* BOS, EOS and padding up to 77."""

    # Optional: ``encode_with_pooled(prompts) -> (context [B, 77, d], pooled [B, p] or None)``, the
    # pooled text embedding a vector-conditioned UNet (SDXL) needs; see `conditioning`.


class Denoiser(Protocol):
    """Runs the diffusion model."""

    def modules(self) -> Mapping[str, torch.nn.Module]:
        """``named_modules()`` of the UNet that actually runs (LDM names, no prefix)."""

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int,
               negative: str = "", on_step: Callable[[int], None] | None = None,
               noise_per_prompt: bool = False) -> torch.Tensor:
        """Full denoising of each prompt; ``on_step(i)`` is called before the model runs for step i
        (i = 0 is the noisiest step). Returns the final latents [B, C, H, W].

        The starting noise comes from `seed`: by default one draw for the whole batch (each prompt
        its own noise, which depends on its slot); with ``noise_per_prompt`` every prompt gets the
        noise a batch of one would get, so a prompt's result does not depend on the batching."""


class Trainable(Protocol):
    """What training-based methods need on top of `Denoiser` (ComfyDenoiser provides it)."""

    latent_channels: int            # the model's latent channels (4 on SD, 16 on SD3 and Flux)
    latent_size: tuple[int, int]    # (h, w) of the latents it draws and trains at

    def unet(self) -> torch.nn.Module:
        """The UNet module (LDM names) as it runs, weights patched."""

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T−1."""

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model's ε-prediction at x_t = √ᾱ x₀ + √(1−ᾱ) ε, integer t, text context [B, 77, d],
        whatever the model's own prediction type (a v-model's output is converted by the host);
        differentiable w.r.t. x, context, y and hooked adapters. `y` = the vector conditioning
        (SDXL's pooled text + size embedding, from `adm`; None for SD1.x/SD2.x). The one way the
        library calls the denoiser directly: every objective here is written in ε."""

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The `y` this model needs for a pooled text embedding (differentiable in `pooled`), or None
        when the model takes none. Optional: hosts without it are treated as needing none."""

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-timestep weights [B] that make an ε-MSE at `t` the model's own training loss (the
        velocity MSE of a rectified-flow model), or None for the ε-MSE itself. Optional: hosts
        without it train on the ε-MSE (`diffusion.objective_mse`)."""


def base_weights(host) -> Mapping[str, torch.Tensor] | None:
    """The host's unpatched weights by ComfyUI key (``Trainable.base_weights()``, optional), the W that
    mask edits are resolved against; None when the host does not say (its modules' weights are then
    taken as they are)."""
    get = getattr(host, "base_weights", None)
    return get() if get is not None else None


def latent_shape(host) -> tuple[int, ...]:
    """(C, H, W) of the latents this host draws from noise: its `latent_channels` (4 when it does
    not say) and `latent_size` (h, w), else a square of `latent_hw` (32 when it says neither); (C, 1,
    H, W), one frame, for a model whose latents are video-shaped (`latent_dims` 3: Wan, Qwen-Image)."""
    h, w = getattr(host, "latent_size", None) or (getattr(host, "latent_hw", 32),) * 2
    c = int(getattr(host, "latent_channels", 4))
    return (c, 1, int(h), int(w)) if getattr(host, "latent_dims", 2) == 3 else (c, int(h), int(w))


def frames(x: torch.Tensor) -> torch.Tensor:
    """Latents or pictures as a batch of single pictures: video-shaped [B, C, T, H, W] (Wan, Qwen-Image,
    one frame drawn) -> [B·T, C, H, W]; 4-D ones as they are."""
    return x.movedim(2, 1).flatten(0, 1) if x.ndim == 5 else x


def conditioning(host, text: TextEncoder, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the UNet is conditioned on for `prompts`: (context [B, 77, d], y [B, adm] or None).

    y = ``host.adm(pooled, B)`` of the text encoder's pooled output (`encode_with_pooled`) for a
    vector-conditioned model (SDXL), None for the others; a host without `adm` takes none. The
    training, audit and distillation paths all encode their prompts through here, so y travels with
    the context wherever the denoiser is called."""
    prompts = list(prompts)
    with_pooled = getattr(text, "encode_with_pooled", None)
    if with_pooled is not None:
        context, pooled = with_pooled(prompts)
    else:
        context, pooled = text.encode(prompts), None
    adm = getattr(host, "adm", None)
    y = adm(pooled, len(prompts)) if adm is not None else None
    return context, y


def cat_y(*ys: torch.Tensor | None) -> torch.Tensor | None:
    """`torch.cat` of vector conditionings that are all tensors, or None when the model takes none."""
    if any(y is None for y in ys):
        if not all(y is None for y in ys):
            raise ValueError("either every part of a batch has its vector conditioning y or none has")
        return None
    return torch.cat(ys)


def rows_y(y: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """y of one prompt (the empty prompt, say) repeated for a batch of n."""
    return None if y is None else y.expand(n, *y.shape[1:])


@dataclass
class RunContext:
    """Progress and Cancel, passed in by the host. Both are optional."""

    progress: Callable[[int, int], None] | None = None  # (done, total)
    should_stop: Callable[[], bool] | None = None
    device: torch.device | None = None
    # Data-parallel training (one process per GPU, e.g. under torchrun): `average` turns
    # this process's gradients into the mean over all processes (in place or returned); `rank`
    # gives each process its own batches. None / 0 = a single process.
    average: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    rank: int = 0

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        self.check()

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled by the user; nothing was applied")


class PhaseRate:
    """The rate of a job's current phase, for a time-left estimate. A report with a new total starts a
    new phase (EMCID: stage 1's concepts, then C₀, then stage 2), and what was done when a phase began
    (work taken from a cache) does not count toward its rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.total: int | None = None
        self.t0 = 0.0
        self.start = 0

    def update(self, done: int, total: int) -> float:
        """Record a report; the seconds since its phase began."""
        now = self.clock()
        if total != self.total:
            self.total, self.t0, self.start = total, now, done
        return now - self.t0

    def seconds_left(self, done: int, total: int) -> float | None:
        """Record a report; the time left at the phase's rate, None while there is no rate or when done."""
        elapsed = self.update(done, total)
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        return (total - done) / rate if rate > 0 and done < total else None


def time_left_text(seconds: float) -> str:
    """'35 s', '3 min', '1.2 h'."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

