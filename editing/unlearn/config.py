"""Unlearning's configuration: the training settings (`UnlearnConfig`: RGD, gradient ascent, ESD) and
the job `compute` takes (`UnlearnJob`: the concept, the retain prompts, the settings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import InvalidInputError
from ..hosts import Job
from ..training import PARAM_SETS


METHODS = ("rgd", "ga", "esd")
FORGET_OBJECTIVES = ("ascent", "esd")
RETAIN_PAIRINGS = ("twins", "independent")
ESD_XT = ("sampled", "noised")
ESD_PROMPTS = ("concept", "templates")
# `official`: "off" is the pack's procedure; "esd" follows Gandikota et al.'s train-esd.py, "rgd" Ko et
# al.'s nsfw_RGD.py as run-surgery.sh runs it, step by step (`official.SOURCES`, `official_config`)
OFFICIAL = ("off", "esd", "rgd")


@dataclass
class UnlearnConfig:
    method: str = "rgd"              # rgd | ga | esd
    forget_objective: str = "ascent"  # RGD's forget gradient: ascent (Ko et al.) or esd
    param_set: str = "lora"          # lora | lora-xattn | xattn (ESD-x) | noxattn (ESD-u)
    rank: int = 4
    steps: int = 100
    lr: float = 1e-4                 # the paper's 1e-5 is for real SD with full fine-tuning
    alpha: float = 1.6               # RGD's retain weight α
    truncation: float = 1.1          # m: RGD's forget loss above m becomes the constant 1 (no forget gradient)
    ga_retain_weight: float = 0.1    # GA optimises −L_f + w·L_r (w = 0.1 in Ko et al.'s gradient_ascent.py)
    # ESD negative-guidance strength η on the unconditional base: η 1 is also the target of Gandikota
    # et al.'s esd_sd.py, whose default 2 is taken on the conditional base (ε₀(c) − 2[ε₀(c) − ε₀(∅)])
    eta: float = 1.0
    batch: int = 4
    n_prompts: int = 16              # forget/retain prompt pairs from the templates
    gen_steps: int = 20              # denoising steps to generate the training images
    gen_cfg: float = 5.0
    t_min: int = 0
    t_max: int = 999
    seed: int = 0
    cache_dir: str | None = None     # keep generated latents as safetensors between runs
    # RGD/GA's retain batch. twins: the concept-free twin of every forget row (Ko et al. zip their
    # forget and retain sets, pair by pair) plus rows of the user's retain prompts; independent: a
    # batch drawn at random from all retain prompts, unrelated to the forget rows.
    retain_pairing: str = "twins"
    # ESD's x_t. sampled: fresh noise partially denoised by the frozen model with the ESD prompt
    # (DDIM, `esd_ddim_steps` steps, guidance `esd_cfg`) to a random step, the target taken at that
    # step's timestep, as Gandikota et al.'s code; noised: the generated training images noised at random t.
    esd_xt: str = "sampled"
    esd_prompt: str = "concept"      # ESD's c: the bare concept (as Gandikota et al.) or the templated forget prompts
    esd_ddim_steps: int = 50
    esd_cfg: float = 3.0
    # follow an official script instead of the pack's choices (`OFFICIAL`): its batches, sampler,
    # losses and full-rank updates; `official_warnings` names the settings it then ignores
    official: str = "off"

    def validate(self) -> "UnlearnConfig":
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.forget_objective not in FORGET_OBJECTIVES:
            raise InvalidInputError(f"forget_objective must be 'ascent' or 'esd', not {self.forget_objective!r}")
        if self.param_set not in PARAM_SETS:
            raise InvalidInputError(f"param_set must be one of {', '.join(PARAM_SETS)}, not {self.param_set!r}")
        for name, choices in (("retain_pairing", RETAIN_PAIRINGS), ("esd_xt", ESD_XT), ("esd_prompt", ESD_PROMPTS)):
            if getattr(self, name) not in choices:
                raise InvalidInputError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        for name in ("steps", "batch", "n_prompts", "gen_steps", "rank", "esd_ddim_steps"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and self.alpha >= 0 and self.truncation > 0 and self.ga_retain_weight >= 0):
            raise InvalidInputError("lr and truncation m must be > 0, α and ga_retain_weight ≥ 0")
        if not 0 <= self.t_min <= self.t_max <= 999:
            raise InvalidInputError(f"need 0 ≤ t_min ≤ t_max ≤ 999 (got {self.t_min}, {self.t_max})")
        if self.official not in OFFICIAL:
            raise InvalidInputError(f"unknown official {self.official!r}; choose one of {', '.join(OFFICIAL)}")
        if self.official == "esd" and self.method != "esd":
            raise InvalidInputError(f"official 'esd' follows ESD's train-esd.py: set method to esd (now "
                                    f"{self.method!r}), or official to off")
        if self.official == "rgd" and (self.method != "rgd" or self.forget_objective != "ascent"):
            raise InvalidInputError(f"official 'rgd' follows Ko et al.'s nsfw_RGD.py: set method to rgd with "
                                    f"forget_objective ascent (now {self.method!r} / {self.forget_objective!r}), or "
                                    "official to off")
        return self

    @property
    def uses_esd(self) -> bool:
        """Whether the forget gradient is ESD's (method esd, or RGD with the esd forget objective)."""
        return self.method == "esd" or (self.method == "rgd" and self.forget_objective == "esd")

    def needs_images(self) -> tuple[bool, bool]:
        """(forget, retain): which generated training images this configuration trains on."""
        return (not self.uses_esd or self.esd_xt == "noised"), self.method in ("rgd", "ga")


@dataclass(kw_only=True)
class UnlearnJob(Job):
    """What unlearning erases: `concept`, with `retain_prompts` (empty: generated ones) kept."""
    concept: str
    settings: UnlearnConfig = field(default_factory=UnlearnConfig)
    retain_prompts: Sequence[str] = ()
