"""Evaluation harness: what a model generates for a set of prompts, read by a concept classifier.

Pure torch. The host passes a sampler, ``sample(prompts, seeds) -> images [B, 3, H, W] in [-1, 1]``
(one image per (prompt, seed) pair), and optionally a classifier, ``classify(images) ->
{kind: [label, ...]}``; by default the tiny world's classifier (``tiny/weights/classifier.safetensors``).

From one `evaluate` call on (prompt, expected concepts) pairs:
- ``presence[c]``: the fraction of samples labelled as concept c (of c's kind);
- ``accuracy[kind]``: the fraction of samples whose label of that kind is the expected one;
- ``concept_accuracy[c]``: the same, over the prompts that ask for concept c.
An erasure is then measured as (`erasure_report`): efficacy = presence of the erased concept on
its own prompts (lower is better), specificity = accuracy on prompts for the other concepts
(higher is better), paraphrase robustness = presence on synonym prompts (lower is better).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .. import worlds

log = logging.getLogger(__name__)

Sampler = Callable[[Sequence[str], Sequence[int]], torch.Tensor]
Classifier = Callable[[torch.Tensor], Mapping[str, Sequence[str]]]
PromptSet = Sequence[tuple[str, Mapping[str, str]]]


@dataclass
class EvalResult:
    n_samples: int
    presence: dict[str, float]
    accuracy: dict[str, float]
    concept_accuracy: dict[str, float]
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self, with_prompts: bool = False) -> dict:
        d = asdict(self)
        if not with_prompts:
            d.pop("per_prompt")
        return d


def default_classifier() -> Classifier:
    """The tiny world's CNN classifier (registered by the host, see `editing.worlds`)."""
    return worlds.classifier("tiny").predict


def evaluate(sample: Sampler, prompts: PromptSet, samples_per_prompt: int = 4,
             classify: Classifier | None = None, seed: int = 0,
             keep_images: bool = False) -> EvalResult:
    """Generate `samples_per_prompt` images per prompt (seeds seed, seed+1, ...) and classify them.

    `prompts` pairs each prompt with the concepts it asks for, by kind ({"shape": "circle", ...});
    kinds a prompt does not name are not scored for it."""
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    classify = classify or default_classifier()
    texts = [p for p, _ in prompts for _ in range(samples_per_prompt)]
    seeds = [seed + i * samples_per_prompt + j for i in range(len(prompts)) for j in range(samples_per_prompt)]
    images = sample(texts, seeds)
    if images.shape[0] != len(texts):
        raise ValueError(f"the sampler returned {images.shape[0]} images for {len(texts)} (prompt, seed) pairs")
    labels = classify(images)
    return score(prompts, samples_per_prompt, labels, images if keep_images else None)


def score(prompts: PromptSet, samples_per_prompt: int, labels: Mapping[str, Sequence[str]],
          images: torch.Tensor | None = None) -> EvalResult:
    """Presence and accuracy rates from classifier labels (in prompt-major order)."""
    n = len(prompts) * samples_per_prompt
    counts: dict[str, int] = {}
    for kind, ls in labels.items():
        for lab in ls:
            counts[lab] = counts.get(lab, 0) + 1
    presence = {c: k / n for c, k in sorted(counts.items())}
    hits: dict[str, list[int]] = {}
    by_concept: dict[str, list[int]] = {}
    per_prompt = []
    for i, (text, expected) in enumerate(prompts):
        rows = range(i * samples_per_prompt, (i + 1) * samples_per_prompt)
        got = {kind: [labels[kind][r] for r in rows] for kind in labels}
        entry = {"prompt": text, "expected": dict(expected), "labels": got}
        for kind, want in expected.items():
            if kind not in labels:
                continue
            ok = [int(g == want) for g in got[kind]]
            hits.setdefault(kind, []).extend(ok)
            by_concept.setdefault(want, []).extend(ok)
            entry[f"{kind}_accuracy"] = sum(ok) / len(ok)
        if images is not None:
            entry["images"] = images[rows.start:rows.stop]
        per_prompt.append(entry)
    accuracy = {k: sum(v) / len(v) for k, v in hits.items()}
    concept_accuracy = {c: sum(v) / len(v) for c, v in sorted(by_concept.items())}
    return EvalResult(n, presence, accuracy, concept_accuracy, per_prompt)


def erasure_report(sample: Sampler, erased: Sequence[str], preserved: Sequence[str],
                   prompts_for: Callable[[str, int, int], PromptSet] | None = None,
                   synonym_prompts: Callable[[str, int, int], PromptSet] | None = None,
                   n_prompts: int = 6, samples_per_prompt: int = 2, seed: int = 0,
                   classify: Classifier | None = None) -> dict:
    """Efficacy, specificity and paraphrase robustness of an erasure, as rates in [0, 1].

    - efficacy[c]   = presence of erased concept c on prompts naming c (lower = better erased);
    - paraphrase[c] = presence of c on prompts naming it only by a synonym (lower = more robust);
    - specificity[c] = accuracy of preserved concept c on its prompts (higher = better kept).
    `prompts_for(concept, n, seed)` / `synonym_prompts(...)` default to the tiny world's."""
    if prompts_for is None or synonym_prompts is None:
        world = worlds.get("tiny")
        prompts_for = prompts_for or world.prompts_for
        synonym_prompts = synonym_prompts or world.synonym_prompts
    classify = classify or default_classifier()
    out: dict[str, dict[str, float]] = {"efficacy": {}, "paraphrase": {}, "specificity": {}}
    for c in erased:
        r = evaluate(sample, prompts_for(c, n_prompts, seed), samples_per_prompt, classify, seed)
        out["efficacy"][c] = r.presence.get(c, 0.0)
        syn = synonym_prompts(c, n_prompts, seed)
        if syn:
            r = evaluate(sample, syn, samples_per_prompt, classify, seed)
            out["paraphrase"][c] = r.presence.get(c, 0.0)
    for c in preserved:
        r = evaluate(sample, prompts_for(c, n_prompts, seed), samples_per_prompt, classify, seed)
        out["specificity"][c] = r.concept_accuracy.get(c, 0.0)
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def write_grid(path: str, rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None = None,
               scale: int = 4, pad: int = 2) -> str:
    """Write rows of images ([N, 3, H, W] in [-1, 1] each) as one PNG grid, e.g. before/after.

    Images are upscaled `scale` times (nearest); optional labels are drawn left of each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("write_grid needs at least one row")
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    ncol = max(r.shape[0] for r in rows)
    label_w = 0
    if row_labels:
        label_w = 8 + 6 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (label_w + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 5), row_labels[i], fill=(0, 0, 0))
        for j, img in enumerate(to_uint8(row)):
            tile = Image.fromarray(img.cpu().numpy()).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (w + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
