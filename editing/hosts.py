"""What the library needs from a host (ComfyUI, the headless CLI, diffusers, tests).

The algorithms never import a host. They receive these small objects, so the same code serves
ComfyUI nodes, the command line and the tests.
"""
from __future__ import annotations

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


class Denoiser(Protocol):
    """Runs the diffusion model."""

    def modules(self) -> Mapping[str, torch.nn.Module]:
        """``named_modules()`` of the UNet that actually runs (LDM names, no prefix)."""

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int,
               negative: str = "", on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Full denoising of each prompt; ``on_step(i)`` is called before the model runs for step i
        (i = 0 is the noisiest step). Returns the final latents [B, C, H, W]."""


class Trainable(Protocol):
    """What training-based methods need on top of `Denoiser` (ComfyDenoiser provides it)."""

    def unet(self) -> torch.nn.Module:
        """The UNet module (LDM names) as it runs, weights patched."""

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T−1."""

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε-prediction at x_t, integer t, text context [B, 77, d]; `y` = the vector conditioning
        (SDXL's pooled text + size embedding; None for SD1.x/SD2.x)."""

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The `y` this model needs for a pooled text embedding (differentiable in `pooled`), or None
        when the model takes none. Optional: hosts without it are treated as needing none."""


@dataclass
class RunContext:
    """Progress and Cancel, passed in by the host. Both are optional."""

    progress: Callable[[int, int], None] | None = None  # (done, total)
    should_stop: Callable[[], bool] | None = None
    device: torch.device | None = None
    # Data-parallel training (one process per GPU, e.g. under `accelerate launch`): `average` turns
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
