"""UCE's configuration: the closed-form edit's settings (`UCEConfig`), the debias loop's
(`DebiasConfig`), and the job `compute` takes (`UCEJob`: both, the judge, and what every job takes)."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..hosts import Job

log = logging.getLogger(__name__)


MODES = ("erase", "redirect", "debias", "moderate")
TOKEN_WINDOWS = ("auto", "aligned", "eos", "last")
LAM_MODES = ("absolute", "relative")
EMPTY_GUIDES = ("eos", "bos")
# Prompt expansion of the official erase script (concept_type art / object): each concept and its
# guide also appear in these templates, so "painting by X" loses X as "X" does.
EXPANSIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "artist": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
}
# the official default guide per kind when none is given: artists go to "art", objects to ""
DEFAULT_GUIDE = {"artist": "art", "object": "", "none": ""}
# Generic prompts whose cross-attention keys/values should not move (the preserve set is the
# user's list plus these unless switched off). Any that mention an edited concept are dropped.
DEFAULT_PRESERVE = (
    "a photo", "a picture", "a painting", "a drawing", "art", "a person", "a man", "a woman", "a child",
    "a face", "a dog", "a cat", "a bird", "a horse", "a car", "a house", "a building", "a street",
    "a city", "a room", "a tree", "a flower", "a forest", "a mountain", "the sea", "the sky",
    "a landscape", "food", "a table", "clothes",
)
# `official`: "off" is the pack's own procedure; each other value follows one script of the UCE
# repository (github.com/rohitgandikota/unified-concept-editing) step by step
OFFICIAL = ("off", "uce_sd_erase", "train_erase")
OFFICIAL_SOURCES = {
    "uce_sd_erase": "trainscripts/uce_sd_erase.py, function UCE (commit ea9644fd83ed929c47ae26aef2681e2b2f24bedb)",
    "train_erase": "train-scripts/train_erase.py, function edit_model, technique 'replace' "
                   "(commit bd5fb515392e986758fa3197e382148227db8f25)",
}
EMPTY_PROMPT = '""'  # how a preserve line names the empty prompt under `official` (a blank line is skipped)


@dataclass
class UCEConfig:
    """Parameters of a closed-form cross-attention edit.

    concepts: the concepts to edit; a line ``source -> target`` gives that concept its own guide.
    mode: erase (to `guide`, default ""), redirect (to `guide` or the per-line target), debias
      (`guide` lists options ``"male:0.5, female:0.5"``; each concept's values become the weighted
      mix of "{option} {concept}"), moderate (every concept to the unconditional "").
    """

    concepts: list[str]
    mode: str = "erase"
    guide: str = ""
    preserve: list[str] = field(default_factory=list)
    default_preserve: bool = True
    lam: float = 0.5             # λ: weight of staying at W (regularises M)
    erase_scale: float = 1.0     # s_e
    preserve_scale: float = 0.1  # s_p
    # how `lam` counts (`solve_lam`): "absolute" = the paper's λ, in squared units of the text
    # embeddings; "relative" = per unit of the edit's text rows' mean square per coordinate, so the
    # edit is the same whatever scale the text encoder outputs. s_e and s_p weigh Grams of those same
    # rows and need no such mode. Absolute stays the default: on the tiny models the mean square is
    # 0.85 (CLIP) and 0.98 (T5), where both modes give the same edit, but SD1.5's is not measured here
    lam_mode: str = "absolute"
    token_window: str = "auto"  # aligned on a causal CLIP's run, eos on a T5 run (see _scheme)
    edit_keys: bool = True       # attn2.to_k
    edit_values: bool = True     # attn2.to_v
    # keep the unconditional prompt's K/V at every position the window edits (not only its BOS):
    # classifier-free guidance subtracts the "" branch from every prompt, so a moved "" shifts all
    preserve_unconditional: bool = True
    # expansion of each concept (and its guide) into the official templates: none, artist, object;
    # with artist and no guide, the guide is "art" as in the official script
    expand: str = "none"
    # with the `last` window an empty guide ("") maps the concept's last token to ""'s EOS (eos) or,
    # as the official code does, to its BOS (bos), the position every prompt attends to
    empty_guide: str = "eos"
    # RECE-style hardening (Gong et al. 2024): after the solve, the embedding c' that makes the edited
    # K/V reproduce each erased token's original K/V is found in closed form, added to the erase set
    # with the same target, and everything re-solved from the original weights; `harden_rounds` times.
    # harden_lam: the ridge of that solve, relative to the mean eigenvalue of W'ᵀW' summed over layers.
    harden_rounds: int = 0
    harden_lam: float = 0.1
    # MMDiT models (Flux, SD3), which have no attn2: the layers the text enters through, the
    # per-token projection (Flux txt_in, SD3 context_embedder) and the pooled one (Flux
    # vector_in.in_layer, SD3 y_embedder.mlp.0); the same closed form, biases kept. The pooled
    # one is off by default: CLIP's pooled vectors of different prompts are nearly parallel (on the
    # tiny Flux cos ≈ 0.9 between "red" and "a blue circle"), so sending one to "" moves them all
    # (|ΔW·k| / |W·k| = 0.78 for "a blue circle") and, measured, left more red (40 % vs 23 %).
    edit_text_tokens: bool = True
    edit_text_pooled: bool = False
    # follow an official script of the UCE repository instead of the pack's choices (`OFFICIAL`): the
    # concepts, guides, preserve prompts, λ, scales and expansion stay these; the token positions, the
    # preserve set's handling and λ's unit become the script's (`official_warnings` names what is ignored)
    official: str = "off"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.official not in OFFICIAL:
            raise InvalidInputError(f"unknown official {self.official!r}; choose one of {', '.join(OFFICIAL)}")
        if self.official != "off" and self.mode == "debias":
            raise InvalidInputError(f"official {self.official!r} follows UCE's erase script, which does not debias: "
                                    "set official to off (the UCE Debias node runs the paper's debias loop)")
        if self.token_window not in TOKEN_WINDOWS:
            raise InvalidInputError(f"unknown token_window {self.token_window!r}; choose {' or '.join(TOKEN_WINDOWS)}")
        if self.expand not in EXPANSIONS:
            raise InvalidInputError(f"unknown expand {self.expand!r}; choose {', '.join(EXPANSIONS)}")
        if self.empty_guide not in EMPTY_GUIDES:
            raise InvalidInputError(f"unknown empty_guide {self.empty_guide!r}; choose eos or bos")
        if not [c for c in self.concepts if c.strip()]:
            raise InvalidInputError("the concept list is empty: give at least one concept to edit (one per line)")
        for name in ("lam", "erase_scale", "preserve_scale"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise InvalidInputError(f"{name} must be a finite number ≥ 0, got {v}")
        if self.erase_scale == 0:
            raise InvalidInputError("erase_scale is 0: the edit would do nothing; use 1 (the paper's value)")
        if self.lam_mode not in LAM_MODES:
            raise InvalidInputError(f"unknown lam_mode {self.lam_mode!r}; choose {' or '.join(LAM_MODES)}")
        if self.lam == 0 and self.preserve_scale == 0:
            log.info("λ = 0 and preserve_scale = 0: the system is solvable only if the edited tokens span the text space")
        if not (self.edit_keys or self.edit_values):
            raise InvalidInputError("edit_keys and edit_values are both off: nothing to edit")
        if self.harden_rounds < 0 or self.harden_rounds > 20:
            raise InvalidInputError(f"harden_rounds must lie in 0..20 (0 = no hardening), got {self.harden_rounds}")
        if not (math.isfinite(self.harden_lam) and self.harden_lam > 0):
            raise InvalidInputError(f"harden_lam must be > 0, got {self.harden_lam}")
        if self.mode == "redirect" and not self.guide.strip() and not all("->" in c for c in self.concepts if c.strip()):
            raise InvalidInputError('redirect needs a target: set guide, or write lines as "source -> target"')
        if self.mode == "debias":
            parse_options(self.guide)


def parse_options(text: str) -> list[tuple[str, float]]:
    """``"male:0.5, female:0.5"`` -> [(option, weight)], weights normalised to sum 1."""
    out = []
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise InvalidInputError(f"debias option {part!r}: the weight after ':' must be a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInputError(f"debias option {part!r}: the weight must be ≥ 0")
        out.append((name.strip(), weight))
    if len(out) < 2:
        raise InvalidInputError('debias needs at least two options in guide, e.g. "male:0.5, female:0.5"')
    total = sum(w for _, w in out)
    if total <= 0:
        raise InvalidInputError("debias option weights sum to 0")
    return [(n, w / total) for n, w in out]


KEEP = ("best", "last")


@dataclass
class DebiasConfig:
    """The closed loop around a debias edit (the desired shares are the weights in UCEConfig.guide)."""

    tolerance: float = 0.05      # stop when every |desired − share| is at most this (official max_diff)
    max_iterations: int = 10     # re-solves after the static mix (official 30)
    step_size: float = 1.0       # η in w ← w + η·gap (official: the gap is added as it is)
    samples: int = 10            # pictures per concept per round (official num_images_per_prompt 10)
    steps: int = 20              # sampler steps per picture (official 20)
    cfg: float = 7.5             # classifier-free guidance (official 7.5)
    seed: int = 0                # the same seed every round: rounds differ only by the edit
    weight_min: float = -1.0     # bounds on each option weight: a weight past [0, 1] extrapolates
    weight_max: float = 2.0      # beyond one option's target, further out it is no longer a mix
    keep: str = "best"           # return the round with the smallest gap (best) or the last one
    # halve a concept's η when its gap changes sign (an overshoot: the shares respond more steeply
    # than η assumes), so a steep response settles instead of swinging; False = the official fixed η
    halve_on_overshoot: bool = True
    measure_original: bool = True  # also measure the unedited model (for the report; one more round)

    def validate(self) -> None:
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance < 1):
            raise InvalidInputError(f"tolerance must lie in [0, 1) (a share gap), got {self.tolerance}")
        if self.max_iterations < 0:
            raise InvalidInputError(f"max_iterations must be ≥ 0 (0 = the static mix only), got {self.max_iterations}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise InvalidInputError(f"step_size must be > 0 (1 adds the gap as it is), got {self.step_size}")
        if self.samples < 1 or self.steps < 1:
            raise InvalidInputError(f"samples and steps must be at least 1, got {self.samples} and {self.steps}")
        if not (math.isfinite(self.weight_min) and math.isfinite(self.weight_max)
                and self.weight_min < 1 / 2 < self.weight_max):
            raise InvalidInputError(f"weight bounds [{self.weight_min}, {self.weight_max}] must be finite and "
                                    "contain the mixes in (0, 1), e.g. -1 and 2")
        if self.keep not in KEEP:
            raise InvalidInputError(f"keep must be best or last, got {self.keep!r}")


@dataclass(kw_only=True)
class UCEJob(Job):
    """UCE's job. With `loop` the debias edit is closed-loop (`debias.debias_uce`): `judge` is a
    callable ``judge(latents, options, concept) -> scores [N, K]`` (latents as the host's sampler
    returns them), an image model the host can turn into one (ComfyUI: a CLIP_VISION, with `vae`
    to decode the pictures for it; `Host.picture_judge`), or None: the unedited model judges by
    presence, on latents (no VAE)."""
    settings: UCEConfig  # the concepts, guides and preserve set are part of UCE's own config
    loop: DebiasConfig | None = None  # None: the single static solve
    judge: Any = None
    vae: Any = None
    judge_template: str = "This is a photo of {}."  # a picture judge's text per option (the official pipeline's)
