"""Bilevel distill-and-unlearn of a pruned student (Shirkavand et al. 2024)."""

from .bilevel import OFFICIAL, DistillConfig, compute_distill_unlearn  # noqa: F401
