"""How few pruned weights bring a concept back (pruning masks: ConceptPrune, structured pruning).

Zhang et al. ("Roots Beneath the Cut", CVPR 2026, arXiv 2603.06640) report that the positions of the
zeroed weights leak the erased concept and that an attack revives it from a pruned model without
data or training. Only the abstract could be read here, and it does not give the procedure, so the
attack itself is not reproduced. What is measured instead is the exposure it relies on: the pruned
weights, ranked by their original magnitude, are restored at their original values a fraction at a
time (1 %, 5 %, ... 100 %), and the concept's presence is read after each step. An erasure that a 1 %
restore undoes sits in very few weights, and a published mask tells where they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..edit import Change, Edit
from ..errors import InvalidInputError
from ..hosts import RunContext

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class RevivalReport:
    pruned_weights: int
    fractions: list[float] = field(default_factory=list)
    presence: list[dict[str, float]] = field(default_factory=list)   # per fraction, per judge

    def to_dict(self) -> dict:
        return {"pruned_weights": self.pruned_weights, "fractions": self.fractions, "presence": self.presence}


def mask_changes(edit: Edit) -> dict[str, Change]:
    return {k: c for k, c in edit.changes.items() if c.kind == "mask"}


def partly_restored(edit: Edit, weights: Mapping[str, torch.Tensor], fraction: float) -> Edit:
    """The edit with the largest-|W| `fraction` of its pruned weights (over all its masks) restored."""
    masks = mask_changes(edit)
    if not masks:
        raise InvalidInputError("revival measures pruning masks; this edit has none")
    mags = []
    for k, c in masks.items():
        idx = c.tensors["index"].long()
        mags.append(weights[k].detach().float().flatten()[idx].abs().cpu())
    mag = torch.cat(mags)
    n_restore = int(round(fraction * mag.numel()))
    restore = torch.zeros(mag.numel(), dtype=torch.bool)
    if n_restore:
        restore[mag.argsort(descending=True)[:n_restore]] = True
    changes = dict(edit.changes)
    start = 0
    for i, (k, c) in enumerate(masks.items()):
        idx = c.tensors["index"]
        keep = ~restore[start:start + idx.numel()]
        start += idx.numel()
        changes[k] = Change("mask", c.shape, {"index": idx[keep]})
    return Edit(edit.method, edit.family, changes, concepts=list(edit.concepts), params=dict(edit.params),
                fingerprint=dict(edit.fingerprint or {}), metrics={})


def revival(edit: Edit, weights: Mapping[str, torch.Tensor], presence: Callable[[Edit], Mapping[str, float]],
            fractions: Sequence[float] = FRACTIONS, ctx: RunContext | None = None) -> RevivalReport:
    """Presence (per judge, `presence(edit)`) after restoring each fraction of the pruned weights."""
    ctx = ctx or RunContext()
    total = sum(int(c.tensors["index"].numel()) for c in mask_changes(edit).values())
    report = RevivalReport(total)
    for i, f in enumerate(sorted(fractions)):
        ctx.check()
        report.fractions.append(float(f))
        report.presence.append(dict(presence(partly_restored(edit, weights, f))))
        ctx.report(i + 1, len(fractions))
    return report
