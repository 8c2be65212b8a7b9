"""Adversarial prompt, UnlearnDiffAtk-style (Zhang et al., ECCV 2024).

The judge is the edited model itself: k soft tokens are put before the concept prompt and optimised
so that the edited model, prompted with [prefix; prompt], predicts the noise of the original model's
concept pictures: min_δ E_t ‖ε_θ'(x_t, t, τ([δ; p])) − ε‖². The found prefix is also projected to
the nearest real tokens, so the report gives a prompt anyone can type.
"""
from __future__ import annotations

from .soft import Setup, SoftPrompt, initial_soft, optimise, placeholders

NAME = "prefix"
DEFAULT_TOKENS = 5


def run(s: Setup) -> SoftPrompt:
    k = s.config.tokens or DEFAULT_TOKENS
    prompts = [f"{placeholders(s.text, k)} {p}" for p in s.concept_prompts]
    return optimise(s, prompts, initial_soft(s.text, k, s.config.seed), lambda xt, t, eps, rows: eps, NAME)
