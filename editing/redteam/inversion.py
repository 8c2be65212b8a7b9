"""Concept inversion, CCE-style (Pham et al. 2024).

Textual inversion of one new token S* on pictures of the concept, against the edited model: the
prompts never name the concept ("a photo of S*", ...), so an edit that only remaps the concept's
own words cannot stop a new word from learning to point at what the model still knows.
"""
from __future__ import annotations

from .soft import Setup, SoftPrompt, initial_soft, optimise, placeholders

NAME = "inversion"
DEFAULT_TOKENS = 1
TEMPLATES = ("a photo of {}", "a picture of {}", "an image of {}", "{}")


def run(s: Setup) -> SoftPrompt:
    k = s.config.tokens or DEFAULT_TOKENS
    word = placeholders(s.text, k)
    return optimise(s, [t.format(word) for t in TEMPLATES], initial_soft(s.text, k, s.config.seed),
                    lambda xt, t, eps, rows: eps, NAME)
