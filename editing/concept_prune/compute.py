"""ConceptPrune as a method: ``compute(host, config) -> Edit``, calibration generations on the host's
denoiser at the job's size, the pruning mask as the edit."""
from __future__ import annotations

from ..edit import Edit
from ..hosts import Host
from ..prompts import build_pairs
from .config import ConceptPruneJob
from .prune import compute_concept_prune


def compute(host: Host, config: ConceptPruneJob) -> Edit:
    pairs = build_pairs(list(config.concepts), config.preset, config.pairs_text)
    return compute_concept_prune(host.denoiser, host.family, pairs, config.settings, host.ctx,
                                 fingerprint=host.fingerprint, cache_dir=config.cache_dir)
