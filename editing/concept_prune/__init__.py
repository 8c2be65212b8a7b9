"""ConceptPrune (Chavhan et al. 2024): skilled FFN-output weights found by WANDA scores on paired
generations and pruned as a mask."""

from .prune import compute_concept_prune, floor_edit, with_preset_defaults
from .config import METHOD, OFFICIAL, PruneConfig
