"""EMCID's per-family hyper-parameters, as data.

The numbers are those of the official code (github:SilentView/EMCID):
- SD (v1.4): ``hparams/dest_s-200_c-1.5_ly-11_lr-0.2_wd-5e-04_txt-align-0.01.json`` (200 Adam steps,
  lr 0.2, ‖δ‖ ≤ 1.5‖h‖, weight decay 5e-4, pooled-output alignment 0.01) with λ = 4000, the
  ``MOM2`` every experiment script passes (``sh_scripts/*.sh``; the json's own 10000 is overridden);
- SDXL: ``hparams/sdxl-dest_s-100_c-1.2_ly-8-11_ly2-26-31_lr-0.1_wd-8e-03_txt-align-0.01.json``
  (100 steps, lr 0.1, clamp 1.2, weight decay 8e-3, 0.005 on each encoder's pooled output,
  λ 4000 for CLIP-L and 10000 for OpenCLIP bigG);
- SD2: the official code has no SD2 settings; SD's are used;
- tiny (the project's own 4-layer, 64-wide model): SD's stage 1 with 100 steps and λ 1000, the λ
  its README table and `bench_unlearn` use.

- Flux (Flux.1 and the tiny Flux): T5 alone, SDXL's stage 1 without the pooled term (no official
  code; see `FLUX`).
- SD3 / SD3.5: all three encoders, SDXL's values on its CLIP-L and CLIP-G (the same two encoders),
  Flux's on its T5 (no official code; see `SD3`).
- A T5 alone (Chroma, PixArt, AuraFlow, Wan) takes Flux's values, one LLM encoder (Qwen-Image,
  HunyuanImage 2.1, Z-Image, Lumina 2, Flux.2) MEMIT's λ and residual (see `T5_ONLY`, `LLM`).

λ as a table holds it is the official absolute number, with the key width it was set at
(`lam_width`: the fc2 input width of the encoder each value was set for, 3072 for CLIP-L, 5120 for
bigG, 10240 for T5-XXL; 256 and 128 for the tiny CLIP and T5 the tiny values were measured on). The
relative default (`EmcidConfig.lam_mode` "relative") is λ / lam_width: on that encoder it gives the
official λ exactly, and on an encoder of another width the same λ per key dimension (see
`config.absolute_lam`).

A layout no table names (`custom`) gets SD3's values when it is an SD3 model or its CLIP is
CLIP-L + CLIP-G + T5, Flux's when it is a Flux model or its CLIP is CLIP-L + T5, SDXL's when it
has two CLIP encoders, else SD's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence


@dataclass(frozen=True)
class FamilyDefaults:
    lam: float                              # λ for an encoder `lam_per_encoder` does not name
    steps: int
    lr: float
    weight_decay: float                     # wd in wd·‖δ‖/‖h‖²
    pooled_weight: float                    # weight of each encoder's pooled-output MSE
    max_norm: float                         # ‖δ‖ ≤ max_norm·‖h‖
    lam_per_encoder: Mapping[str, float] = field(default_factory=dict)
    encoders: tuple[str, ...] | None = None  # the text encoders edited by default; None = every one
    residual: str = "official"              # stage 2's residual (`EmcidConfig.residual`)
    residual_per_encoder: Mapping[str, str] = field(default_factory=dict)
    # the key (fc2 input) width each λ above was set at, for the relative default
    lam_width: int = 3072
    lam_width_per_encoder: Mapping[str, int] = field(default_factory=dict)

    def lam_for(self, encoder: str) -> float:
        """The table's absolute λ (the official code's number) for one encoder."""
        return float(self.lam_per_encoder.get(encoder, self.lam))

    def relative_lam_for(self, encoder: str) -> float:
        """The same λ per key dimension: λ / the width it was set at."""
        return self.lam_for(encoder) / float(self.lam_width_per_encoder.get(encoder, self.lam_width))

    def residual_for(self, encoder: str) -> str:
        return self.residual_per_encoder.get(encoder, self.residual)


SD = FamilyDefaults(lam=4000.0, steps=200, lr=0.2, weight_decay=5e-4, pooled_weight=0.01, max_norm=1.5)
SDXL = FamilyDefaults(lam=10000.0, steps=100, lr=0.1, weight_decay=8e-3, pooled_weight=0.005, max_norm=1.2,
                      lam_per_encoder={"clip_l": 4000.0, "clip_g": 10000.0}, lam_width=5120,
                      lam_width_per_encoder={"clip_l": 3072, "clip_g": 5120})
TINY = FamilyDefaults(lam=1000.0, steps=100, lr=0.2, weight_decay=5e-4, pooled_weight=0.01, max_norm=1.5,
                      lam_width=256)

# Flux reads the tokens from T5 alone; CLIP-L gives only the pooled vector (vector_in), which
# barely separates concepts (tiny Flux: cos 0.9 between "red" and "a blue circle"), so EMCID edits
# T5 there. No official numbers exist for T5; stage 1 takes SDXL's and T5 has no pooled output.
# Stage 2 uses MEMIT's residual: the official one aims each layer's fc2 output at Z and on the
# tiny T5 left 87 % of the gap at λ 100 where MEMIT's left 4 % (bench_flux --part tokens).
# λ 4000 for T5-XXL is CLIP-L's value, not measured on T5; the tiny T5's 100 is.
FLUX = FamilyDefaults(lam=4000.0, steps=100, lr=0.1, weight_decay=8e-3, pooled_weight=0.0, max_norm=1.2,
                      encoders=("t5xxl",), residual="memit", lam_width=10240)
TINY_FLUX = replace(FLUX, lam=100.0, lam_width=128)
# SD3 reads CLIP-L ‖ CLIP-G (the pooled vector and the first 77 context rows) and T5 (the rows after
# them), so a concept left in any one of them still reaches the model: EMCID edits all three, the
# CLIPs as on SDXL (the same two encoders, with SDXL's official values), T5 as on Flux (MEMIT's
# residual, λ 4000). Stage 1 optimises the three δ jointly with SDXL's settings.
SD3 = replace(SDXL, lam_per_encoder={"clip_l": 4000.0, "clip_g": 10000.0, "t5xxl": FLUX.lam},
              lam_width_per_encoder={"clip_l": 3072, "clip_g": 5120, "t5xxl": FLUX.lam_width},
              residual_per_encoder={"t5xxl": FLUX.residual})

# A T5 alone (Chroma and PixArt: T5-XXL; AuraFlow: Pile-T5-XL; Wan: umT5-XXL) is the context itself,
# as Flux's T5 is: Flux's values on the one encoder there is.
T5_ONLY = replace(FLUX, encoders=None)
# One causal LLM encoder (Qwen-Image and HunyuanImage 2.1: Qwen2.5-VL; Z-Image: Qwen3; Lumina 2:
# Gemma 2; Flux.2: Mistral 3). No EMCID numbers exist for them; this is MEMIT's home ground, so
# stage 2 takes MEMIT's residual and its λ (mom2_update_weight 15000, set on GPT-J's 16384-wide MLP
# keys), stage 1 Flux's (SDXL's, no pooled term: these encoders give none). Not measured on any of
# these models.
LLM = replace(FLUX, encoders=None, lam=15000.0, lam_width=16384)

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {"sd1": SD, "sd2": SD, "sdxl": SDXL, "tiny": TINY, "flux1": FLUX,
                                              "tiny-flux": TINY_FLUX, "sd3-medium": SD3, "sd3.5-large": SD3,
                                              "chroma": T5_ONLY, "pixart": T5_ONLY, "auraflow": T5_ONLY,
                                              "wan": T5_ONLY, "qwen-image": LLM, "hunyuan-image": LLM,
                                              "z-image": LLM, "lumina2": LLM, "flux2": LLM}

# the hyper-parameters the table fills when the config leaves them at None
TABLE_FIELDS = ("lam", "steps", "lr", "weight_decay", "pooled_weight", "max_norm", "residual")


def defaults_for(family: str | None, encoders: Sequence[str], kind: str | None = None) -> tuple[str, FamilyDefaults]:
    """(the table's key, its values) for a family name; an unknown layout gets SD3's values when it
    is an SD3 model (`kind`, the layout's: whatever CLIP is connected, so a wrong one is named as
    such) or its CLIP is CLIP-L + CLIP-G + T5, Flux's when it is a Flux model or its CLIP is
    CLIP-L + T5, else SDXL's with two or more text encoders, else SD's."""
    if family in FAMILY_DEFAULTS:
        return family, FAMILY_DEFAULTS[family]
    encoders = tuple(encoders)
    if kind == "sd3" or (kind is None and {"clip_g", "t5xxl"} <= set(encoders)):
        return "sd3-medium", SD3
    if kind == "flux" or ("t5xxl" in encoders and "clip_g" not in encoders):
        return "flux1", FLUX
    return ("sdxl", SDXL) if len(encoders) >= 2 else ("sd1", SD)
