"""Unlearning by fine-tuning: RGD (Ko et al. 2024), gradient ascent and ESD (Gandikota et al. 2023),
trained as adapters on a frozen UNet."""

from .trainer import PRESETS, compute_unlearn, paired_prompts, preset_config
from .config import FORGET_OBJECTIVES, METHODS, OFFICIAL, UnlearnConfig
