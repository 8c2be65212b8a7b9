"""The judge interface (`Judge`) and what a host gives a judge (`JudgeContext`); the judges
themselves and their registry are in `judges`, NudeNet's in `nudenet`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .prompts import PromptCase


@dataclass
class JudgeContext:
    """What a judge may need from the host for one model side."""

    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> pictures [B, 3, H, W] in [-1, 1]
    denoiser: Any = None        # `hosts.Trainable` of this side's model (presence)
    text: Any = None            # its `hosts.Text`
    latent_in: Callable[[torch.Tensor], torch.Tensor] | None = None  # sampled latents -> the UNet's scale
    world: str | None = None    # the bundled world the model draws, when it is one ("tiny")
    should_stop: Callable[[], bool] | None = None
    options: dict | None = None  # per-judge settings by judge name
    # the original model's text encoder: a judge that must read both sides alike (clip) takes its text
    # tower from here, not from an edited CLIP; None: `text`
    reference_text: Any = None


class Judge:
    name = "judge"
    reads = "own"

    def identity(self) -> dict:
        return {"name": self.name}

    def judge(self, x: torch.Tensor, cases: Sequence[PromptCase]) -> list[dict]:
        raise NotImplementedError

    def summary(self, results: Sequence[dict]) -> dict[str, float]:
        """Aggregates of this judge's per-picture results over a group of pictures beyond the runner's
        own mean score / label shares, as {metric: value} (nudenet: its per-class counts)."""
        return {}
