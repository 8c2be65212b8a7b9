"""Iterative debiasing with UCE (Gandikota et al. 2023, debiasing; the official `trainscripts/uce_sd_debias.py`).

The static debias edit gives every concept the values v* = Σ_k w_k · W c("{option_k} {concept}")
with w = the desired shares. That fixes where the values point, not what the model then draws: the
pictures of "a doctor" need not come out 50 % "male", 50 % "female" (attention, the rest of the
prompt and the sampler all stand between the values and the picture). The paper closes the loop:

    repeat: generate N pictures of each concept with the edited model,
            let a judge say which option each picture shows (zero-shot CLIP in the paper),
            gap_k = desired_k − share_k,
            if every |gap_k| ≤ tolerance for every concept: stop,
            w_k ← w_k + η · gap_k     (per concept; a concept already within tolerance keeps its w),
            re-solve UCE from the ORIGINAL weights with the new w.

Every round solves from the unedited W, never from the previous round's edit, so a round's result
depends only on its weights (the official script also re-solves from the original modules; what it
accumulates, in place, is the target v* = W c_concept + Σ_k α_k W c_option_k with α summing the gaps
from 0). Differences from it: the first edit here is the static mix (w = desired), the targets are
the "{option} {concept}" prompts the static edit uses, η (1 there, its `step_size` argument is parsed
but unused) is halved for a concept whose gap turns around, so a steep response settles instead of
swinging (`halve_on_overshoot=False` keeps η fixed), the same seed serves every round (there each
round draws new noise), so the rounds differ only by the edit, and the best round is returned
(there the last). The shares are the judge's top option per picture, counted, as the official
script counts CLIP's top label; the unedited model is measured once for the report.

Host services are injected: `generate(edit or None, prompts, seed) -> samples` (None: the unedited
model) and `judge(samples, options, concept) -> scores [N, K]` (higher = more that option). Judges
built here: `similarity_judge` (CLIP-style: image and text embeddings, cosine similarity) and
`presence_judge` (the unedited diffusion model itself as a zero-shot classifier: which option
prompt helps it denoise the picture most, `audit.presence`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import torch

from ..arch import Family
from ..audit.presence import PresenceConfig, presence_scores
from ..edit import Edit
from ..errors import InvalidInputError, NonFiniteError
from ..hosts import RunContext, Text, Trainable
from .closed_form import _base_concepts, compute_uce
from .config import DebiasConfig, UCEConfig, parse_options

log = logging.getLogger(__name__)

Generator = Callable[[Edit | None, Sequence[str], int], Any]
Judge = Callable[[Any, Sequence[str], str], torch.Tensor]


def shares_from_scores(scores: torch.Tensor, n_options: int) -> torch.Tensor:
    """Per-picture judge scores [N, K] -> the share of pictures whose top option is k (K values, sum 1)."""
    s = torch.as_tensor(scores).detach().float().cpu()
    if s.ndim != 2 or s.shape[1] != n_options or s.shape[0] < 1:
        raise InvalidInputError(f"the judge must score every picture for each of the {n_options} options "
                                f"([pictures, {n_options}]), got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise NonFiniteError("the judge returned NaN/Inf scores")
    return torch.bincount(s.argmax(1), minlength=n_options).double() / s.shape[0]


def adjust_weights(weights: torch.Tensor, shares: torch.Tensor, desired: torch.Tensor, step_size: float,
                   tolerance: float, bounds: tuple[float, float] = (-1.0, 2.0)) -> tuple[torch.Tensor, bool]:
    """One step of the loop for one concept: (new weights, whether this concept is within tolerance).

    w ← clamp(w + η (desired − shares)). The gaps sum to 0 (shares and desired both sum to 1), so
    the weights keep their sum (1 for a mix) unless a bound cuts a step short. A concept whose every
    gap is within tolerance keeps its weights (the official script zeroes its gaps)."""
    gap = desired.double() - shares.double()
    if float(gap.abs().max()) <= tolerance + 1e-9:
        return weights.clone(), True
    return (weights.double() + step_size * gap).clamp(*bounds), False


def next_step_size(step_size: float, gap: torch.Tensor, previous_gap: torch.Tensor | None) -> float:
    """η for a concept's next step: halved when its gap turned around (⟨gap, previous gap⟩ < 0)."""
    if previous_gap is not None and float((gap.double() * previous_gap.double()).sum()) < 0:
        return step_size / 2
    return step_size


def debias_uce(text: Text, weights: Mapping[str, torch.Tensor], family: Family, config: UCEConfig,
               loop: DebiasConfig, generate: Generator, judge: Judge, ctx: RunContext | None = None,
               norms: Mapping[str, Callable] | None = None) -> Edit:
    """The iterative debias procedure; returns the chosen round's UCE edit with the rounds in
    ``metrics["debias"]`` (weights, shares and the largest gap of each, the unedited model's shares).

    `generate(edit, prompts, seed)`: samples of the model with `edit` applied (None = unedited);
    `judge(samples, options, concept)`: scores [N, K]. Cancel and progress go through `ctx`; the UCE
    solves inside run without their own progress bar. `norms`: as `compute_uce`'s."""
    ctx = ctx or RunContext()
    config.validate()
    loop.validate()
    if config.mode != "debias":
        raise InvalidInputError(f"the debias loop needs mode 'debias', not {config.mode!r}")
    options = parse_options(config.guide)
    names = [o for o, _ in options]
    desired = torch.tensor([w for _, w in options], dtype=torch.float64)
    concepts = list(dict.fromkeys(_base_concepts(config)))
    text = _MemoText(text)  # every round encodes the same prompts
    inner = RunContext(should_stop=ctx.should_stop, device=ctx.device)
    total = loop.max_iterations + 1 + int(loop.measure_original)
    done = 0

    def measure(edit: Edit | None) -> dict[str, torch.Tensor]:
        out = {}
        for c in concepts:
            ctx.check()
            samples = generate(edit, [c] * loop.samples, loop.seed)
            out[c] = shares_from_scores(judge(samples, names, c), len(names))
        return out

    def listed(d: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
        return {c: [round(float(x), 6) for x in v] for c, v in d.items()}

    ctx.report(0, total)
    original = None
    if loop.measure_original:
        original = measure(None)
        done += 1
        ctx.report(done, total)
    w = {c: desired.clone() for c in concepts}
    eta = {c: loop.step_size for c in concepts}
    previous: dict[str, torch.Tensor] = {}
    rounds: list[dict] = []
    best: tuple[float, int, Edit] | None = None
    edit = None
    for it in range(loop.max_iterations + 1):
        edit = compute_uce(text, weights, family, config, inner, option_weights={c: w[c].tolist() for c in concepts},
                           norms=norms)
        edit.params = dict(edit.params, option_weights=listed(w))
        shares = measure(edit)
        gap = max(float((desired - shares[c]).abs().max()) for c in concepts)
        rounds.append({"iteration": it, "weights": listed(w), "shares": listed(shares), "max_gap": round(gap, 6),
                       "step_size": {c: eta[c] for c in concepts}})
        log.info("UCE debias round %d: max gap %.3f, shares %s", it, gap, listed(shares))
        if best is None or gap < best[0] - 1e-9:
            best = (gap, it, edit)
        done += 1
        ctx.report(done, total)
        if gap <= loop.tolerance + 1e-9 or it == loop.max_iterations:
            break
        for c in concepts:
            g = desired - shares[c]
            if loop.halve_on_overshoot:
                eta[c] = next_step_size(eta[c], g, previous.get(c))
            previous[c] = g
            w[c] = adjust_weights(w[c], shares[c], desired, eta[c], loop.tolerance,
                                  (loop.weight_min, loop.weight_max))[0]
    ctx.report(total, total)
    gap, chosen, result = best if loop.keep == "best" else (rounds[-1]["max_gap"], rounds[-1]["iteration"], edit)
    result = copy.copy(result)
    result.metrics = dict(result.metrics)
    result.params = dict(result.params, debias_loop=asdict(loop))
    result.metrics["debias"] = {
        "options": names, "desired": [float(x) for x in desired],
        "original_shares": listed(original) if original is not None else None,
        "static_shares": rounds[0]["shares"], "reached_shares": rounds[chosen]["shares"],
        "static_max_gap": rounds[0]["max_gap"], "reached_max_gap": round(gap, 6),
        "converged": gap <= loop.tolerance + 1e-9, "chosen_iteration": chosen, "rounds": rounds,
    }
    return result


def report_text(edit: Edit) -> str:
    """The rounds of a debias edit as a small plain-text table (a node's STRING output)."""
    d = edit.metrics.get("debias")
    if not d:
        return "not an iteratively debiased edit"
    opts = d["options"]
    fmt = lambda v: " ".join(f"{o}={x:.2f}" for o, x in zip(opts, v))  # noqa: E731
    lines = ["target: " + fmt(d["desired"])]
    for c in d["static_shares"]:
        if d["original_shares"]:
            lines.append(f"{c}: unedited {fmt(d['original_shares'][c])}")
        for r in d["rounds"]:
            mark = " <- chosen" if r["iteration"] == d["chosen_iteration"] else ""
            lines.append(f"{c}: round {r['iteration']} weights [{', '.join(f'{x:.2f}' for x in r['weights'][c])}] "
                         f"shares {fmt(r['shares'][c])}{mark}")
    lines.append(f"largest gap: static mix {d['static_max_gap']:.3f} -> reached {d['reached_max_gap']:.3f} "
                 f"({'within' if d['converged'] else 'not within'} tolerance)")
    return "\n".join(lines)


# ---- judges -----------------------------------------------------------------------------------------
def similarity_judge(encode_images: Callable[[Any], torch.Tensor], encode_texts: Callable[[list[str]], torch.Tensor],
                     template: str = "This is a photo of {}.") -> Judge:
    """Zero-shot CLIP as in the paper: scores = cos(image embedding, text embedding of `template`
    filled with each option). `encode_images(samples) -> [N, e]`, `encode_texts(prompts) -> [K, e]`
    must be the two towers of one CLIP (the same embedding space)."""
    if "{}" not in template:
        raise InvalidInputError(f"the judge template {template!r} needs a {{}} where the option goes")

    @torch.no_grad()
    def judge(samples, options: Sequence[str], concept: str) -> torch.Tensor:
        img = encode_images(samples).float()
        txt = encode_texts([template.format(o) for o in options]).float().to(img.device)
        if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
            raise InvalidInputError(f"image embeddings {tuple(img.shape)} and text embeddings {tuple(txt.shape)} "
                                    "are not in one space: connect the CLIP vision model that pairs with this text encoder")
        return torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T

    return judge


def presence_judge(host: Trainable, text: Text, config: PresenceConfig | None = None,
                   to_x0: Callable[[Any], torch.Tensor] | None = None, ctx: RunContext | None = None) -> Judge:
    """The unedited model as the judge (a diffusion classifier): a picture's score for option k is the
    presence gain of the prompt "{option_k} {concept}" on it (`audit.presence.presence_scores`: how
    much that prompt lowers the denoising error against the empty prompt, the same noise for every
    option). Works on latents, no VAE. `to_x0`: samples -> the UNet's latent scale (ComfyUI:
    `process_latent_in`)."""
    config = config or PresenceConfig(timesteps=(200, 400, 600), noise_draws=1)

    @torch.no_grad()
    def judge(samples, options: Sequence[str], concept: str) -> torch.Tensor:
        x0 = to_x0(samples) if to_x0 is not None else samples
        cols = [presence_scores(host, text, [f"{o} {concept}"] * x0.shape[0], x0, config, ctx).gain for o in options]
        return torch.tensor(cols, dtype=torch.float64).T

    return judge


class _MemoText:
    """A Text that encodes each prompt once (the loop re-solves with the same prompts)."""

    def __init__(self, text: Text):
        self.text = text
        self.cache: dict[str, torch.Tensor] = {}

    def token_ids(self, prompt: str):
        return self.text.token_ids(prompt)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            for p, e in zip(todo, self.text.encode(todo)):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts])

    def __getattr__(self, name):  # anything else a host text encoder offers (pooled, conditioning)
        return getattr(self.text, name)
