"""Bilevel distill-and-unlearn of a pruned student (Shirkavand et al. 2024)."""

from .bilevel import compute_distill_unlearn
from .config import OFFICIAL, DistillConfig
