"""Embedding match, P4D-style (Chin et al. 2024).

A soft prompt of k tokens for the edited model whose noise prediction matches the *original*
model's prediction for the concept prompt at the same x_t: min ‖ε_θ'(x_t, t, p*) − ε_θ(x_t, t, p)‖².
Both models are in the graph, so no picture labels are needed; x_t comes from the original's
concept pictures, and the target is the original model with the original text encoder.
"""
from __future__ import annotations

import torch

from .soft import Setup, SoftPrompt, initial_soft, optimise, placeholders

NAME = "embedding_match"
DEFAULT_TOKENS = 16


def run(s: Setup) -> SoftPrompt:
    k = s.config.tokens or DEFAULT_TOKENS
    n = len(s.concept_prompts)
    with torch.no_grad():
        c_concept, pooled = s.original_text.encode_soft(list(s.concept_prompts), None)
    y_concept = s.host.adm(pooled, n) if hasattr(s.host, "adm") else None

    def target(xt, t, eps, rows):
        idx = (rows % n).to(c_concept.device)
        y = None if y_concept is None else y_concept[idx].to(xt.device)
        with torch.no_grad():
            return s.original_eps(xt, t, c_concept[idx].to(xt.device), y)

    prompts = [placeholders(s.text, k)] * n
    return optimise(s, prompts, initial_soft(s.text, k, s.config.seed), target, NAME)
