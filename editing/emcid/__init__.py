"""EMCID (Xiong et al. 2024): stage 1 optimises each concept's target through the diffusion model
(`stage1`), stage 2 writes all targets into the text encoder's fc2 layers in closed form (`stage2`),
preserving generic captions (`captions`); `compute` runs them as one edit."""

from .compute import compute_emcid, destination_targets, edit_layers  # noqa: F401
from .stage2 import parse_pairs, validate_pairs
from .config import DEFAULT_TEMPLATES, EmcidConfig
