"""Unlearning as a method: ``compute(host, config) -> Edit``, adapters trained on the host's frozen
denoiser (RGD, gradient ascent, ESD)."""
from __future__ import annotations

from ..edit import Edit
from ..hosts import Host
from .config import UnlearnJob
from .trainer import compute_unlearn


def compute(host: Host, config: UnlearnJob) -> Edit:
    denoiser = host.denoiser
    with host.training(model=True, freeze=False):  # the trainer freezes the network it trains on itself
        return compute_unlearn(denoiser, denoiser.text, config.concept, config.settings,
                               retain_prompts=list(config.retain_prompts), family=host.family.name, ctx=host.ctx)
