"""Distill-and-unlearn's configuration: the bilevel training's settings (`DistillConfig`) and the job
`compute` takes (`DistillJob`: the teacher, the concept, the prompts, the settings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InvalidInputError
from ..hosts import Job
from ..training import PARAM_SETS


KEEP_PRUNED = ("mask", "skip", "off")
FEATURE_KD = ("levels", "blocks")
# `official`: "off" is the pack's procedure; "bilevel" follows BilevelUnetFineTuner of the official
# code (`OFFICIAL_SOURCE`) step by step (`official_config` / `official_warnings`)
OFFICIAL = ("off", "bilevel")
OFFICIAL_SOURCE = ("rezashkv/unlearn-ft pdm/training/trainer.py (BilevelUnetFineTuner.train / step / upper_step) "
                   "with configs/baselines/sd-2-1_coco_aptp_both_512_bilevel.yaml (commit "
                   "7a9f282d17311f506c587437a3fd8ad9fa5b7bbc)")
# A student model of its own carries its pruning in its weights: a layer counts as pruned when at
# least this share of it is exactly zero (ConceptPrune prunes ≥ 1 % of every row; a float16
# checkpoint has ~1e-6 of its weights rounded to 0, which must not make a layer "pruned").
PRUNED_SHARE = 1e-3


@dataclass
class DistillConfig:
    """Defaults follow the official configs (configs/baselines/*_bilevel.yaml) where the tiny model
    allows: loss weights 1 / 2.0 / 0.1, Min-SNR γ 5, AdamW β (0.9, 0.999), ε 1e-8, weight decay 0,
    one upper (erase) step per 10. Their learning rates (1e-6 / 5e-6) are for a full fine-tune of
    SD2.1; a LoRA here takes 1e-3."""

    steps: int = 100
    erase_every: int = 10        # 9 distillation steps, then 1 erase step
    erase: bool = True
    lr_distill: float = 1e-3
    lr_erase: float = 1e-3
    w_out: float = 2.0           # output KD weight
    w_feat: float = 0.1          # feature KD weight
    feature_kd: str = "levels"   # "levels": mean over level outputs (official); "blocks": sum over transformer blocks
    min_snr_gamma: float = 5.0   # Min-SNR-γ weighting of the diffusion term; 0 = the model's own objective (ε; velocity on flow models)
    weight_decay: float = 0.0    # AdamW's, both optimisers (official: 0)
    eta: float = 1.0
    param_set: str = "lora"
    rank: int = 4
    keep_pruned: str = "mask"    # "mask": pruned weights stay 0; "skip": pruned layers do not train; "off": may regrow
    batch: int = 4
    n_prompts: int = 16
    gen_steps: int = 20
    gen_cfg: float = 5.0
    seed: int = 0
    # linear warm-up of both learning rates over this many of each optimiser's steps (the official
    # "constant_with_warmup"; its configs take 250), 0 = none
    warmup_steps: int = 0
    # "bilevel": the official loop (`OFFICIAL`): a distillation step every step and an extra erase step
    # after every erase_every-th, full-rank updates, η 1, batches drawn without replacement
    official: str = "off"

    def validate(self) -> "DistillConfig":
        if self.steps < 1 or self.erase_every < 2 or self.batch < 1 or self.n_prompts < 1:
            raise InvalidInputError("need steps ≥ 1, erase_every ≥ 2 (e.g. 10 for 9:1), batch and n_prompts ≥ 1")
        if self.param_set not in PARAM_SETS:
            raise InvalidInputError(f"param_set must be one of {', '.join(PARAM_SETS)}")
        if min(self.lr_distill, self.lr_erase) <= 0 or min(self.w_out, self.w_feat) < 0:
            raise InvalidInputError("learning rates must be > 0 and KD weights ≥ 0")
        if isinstance(self.keep_pruned, bool):  # the earlier boolean form
            self.keep_pruned = "mask" if self.keep_pruned else "off"
        if self.keep_pruned not in KEEP_PRUNED:
            raise InvalidInputError(f"keep_pruned must be one of {', '.join(KEEP_PRUNED)} ('mask': pruned weights stay "
                                    f"zero), got {self.keep_pruned!r}")
        if self.feature_kd not in FEATURE_KD:
            raise InvalidInputError(f"feature_kd must be 'levels' (the official mean over the UNet's level outputs) or "
                                    f"'blocks' (sum over transformer blocks), got {self.feature_kd!r}")
        if not self.min_snr_gamma >= 0 or self.weight_decay < 0:
            raise InvalidInputError("min_snr_gamma must be ≥ 0 (5 as in the paper, 0 = off) and weight_decay ≥ 0")
        if self.warmup_steps < 0:
            raise InvalidInputError(f"warmup_steps must be ≥ 0 (0 = no warm-up; the official configs take 250), got "
                                    f"{self.warmup_steps}")
        if self.official not in OFFICIAL:
            raise InvalidInputError(f"unknown official {self.official!r}; choose one of {', '.join(OFFICIAL)}")
        return self


@dataclass(kw_only=True)
class DistillJob(Job):
    """The host's model is the pruned student; `teacher` the full model it is distilled from, read
    through the same text encoder (ComfyUI: a MODEL; `Host.other`)."""
    teacher: Any
    concept: str = ""            # empty: distillation only
    settings: DistillConfig = field(default_factory=DistillConfig)
    distill_prompts: Sequence[str] = ()
