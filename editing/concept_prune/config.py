"""ConceptPrune's configuration: the calibration and selection settings (`PruneConfig`) and the job
`compute` takes (`ConceptPruneJob`: the concepts, their prompt pairs, the settings, the cache)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..diffusion import plms_timesteps
from ..errors import InvalidInputError
from ..hosts import Job


METHOD = "concept_prune"
# "off": the pack's procedure; "concept-prune": the authors' code (see prune.py's docstring)
OFFICIAL = ("off", "concept-prune")
OFFICIAL_SOURCE = ("github:ruchikachavhan/concept-prune at commit 72927d9a2b518caed4e5dddd8549d04b168ad5d7: "
                   "wanda/wanda.py, neuron_receivers/wanda_receiver.py, utils/base_utils.py, "
                   "wanda/save_union_over_time.py; diffusers' StableDiffusionPipeline + PNDMScheduler (SD1.x config)")
# what wanda/wanda.py's pipeline call runs with (StableDiffusionPipeline's defaults, never overridden)
OFFICIAL_STEPS, OFFICIAL_CFG = 50, 7.5
# utils/base_utils.py: the StableDiffusionPipeline model ids the official scripts load
OFFICIAL_FAMILIES = ("sd1", "sd2")


@dataclass
class PruneConfig:
    """ConceptPrune's hyper-parameters (paper defaults: 50 steps, CFG 7.5, seed 0)."""

    skill_ratio: float = 0.01   # k = ⌊skill_ratio · 4d⌋ weights per output row and step
    tau: int = 10               # union over the first τ denoising steps
    steps: int = 50             # denoising steps of each calibration generation
    cfg: float = 7.5
    seed: int = 0               # every prompt starts from this seed's noise
    batch_size: int = 8         # prompts per generation call (speed and memory only; the mask is the same)
    negative: str = ""
    full_trajectory: bool = False  # run every step even though only the first τ matter
    select_ratio: float = 0.0   # pruned when skilled at more than select_ratio·τ of the first τ steps (0: the union)
    official: str = "off"       # one of OFFICIAL: "concept-prune" runs the authors' procedure

    def validate(self) -> None:
        if self.official not in OFFICIAL:
            raise InvalidInputError(f"official must be one of {', '.join(map(repr, OFFICIAL))}, got {self.official!r}: "
                                    "'off' for the pack's procedure, 'concept-prune' for the authors' code")
        if not 0.0 < self.skill_ratio <= 1.0:
            raise InvalidInputError(f"skill_ratio must be in (0, 1], got {self.skill_ratio}; the paper uses 0.01-0.02")
        if self.steps < 1:
            raise InvalidInputError(f"steps must be at least 1, got {self.steps}")
        n = self.evaluations
        if not 1 <= self.tau <= n:
            what = (f"the {n} UNet evaluations of {self.steps} PNDM steps" if self.official != "off"
                    else f"steps={self.steps}")
            raise InvalidInputError(f"tau (the number of early steps whose skilled weights are pruned) must be "
                                    f"between 1 and {what}, got {self.tau}")
        if not 0.0 <= self.select_ratio < 1.0:
            raise InvalidInputError(f"select_ratio must be in [0, 1), got {self.select_ratio}; 0 (every published "
                                    "run) prunes the union of the first τ steps' skilled weights")
        if self.cfg < 0:
            raise InvalidInputError(f"cfg must be >= 0, got {self.cfg}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {self.batch_size}")

    @property
    def evaluations(self) -> int:
        """Model evaluations of one calibration generation, the "steps" the statistics and τ count:
        `steps` for the host's sampler; the PNDM schedule's length (steps + 1) for official."""
        return len(plms_timesteps(self.steps)) if self.official != "off" else self.steps

    @property
    def kept_steps(self) -> int:
        return self.evaluations if self.full_trajectory else self.tau


@dataclass(kw_only=True)
class ConceptPruneJob(Job):
    """What ConceptPrune edits: `concepts` with the preset's calibration prompt pairs, or the user's own
    ``concept prompt | reference prompt`` lines (`pairs_text`)."""
    concepts: Sequence[str]
    preset: str = "tiny"
    pairs_text: str = ""
    settings: PruneConfig = field(default_factory=PruneConfig)
    cache_dir: str | None = None  # each batch's calibration statistics as it finishes (a stopped run resumes)
