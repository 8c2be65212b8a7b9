"""Any Edit -> a kohya-format LoRA file that stock ComfyUI, Automatic1111/Forge and diffusers load.

Per changed weight (ComfyUI key -> kohya module name via `Family.to_kohya*`):
- ``lowrank`` (UCE, EMCID): written exactly, ``lora_up.weight`` = up · c and ``lora_down.weight`` =
  down · c with c = √(rank / alpha) and one ``alpha`` for the whole file (its largest rank), so the
  loader's up · down · alpha / rank is up @ down (c = 1 when all ranks are equal). A rank cap
  truncates it by SVD.
- ``delta`` (dense ΔW): truncated SVD, the smallest rank whose relative Frobenius error is at most
  `max_rel_error` (or a fixed `rank`); the error is reported per key. Or ``dense_as="diff"``: the
  full delta as ``.diff`` (exact, big).
- ``mask`` (ConceptPrune): always ``.diff``. ΔW = −W ⊙ M depends on the base weights, so the
  export needs them (`base`), and a pruning mask is sparse and full-rank, which SVD cannot
  compress. Such a file is tied to that checkpoint: on another checkpoint it subtracts the wrong
  values.
``.diff`` modules are read by ComfyUI's LoraLoader and by A1111's built-in Lora; diffusers'
``load_lora_weights`` refuses a kohya file that holds any (ValueError "keys have not been correctly
renamed"), so for diffusers keep ``dense_as="svd"`` and apply masks with
`editing.export.diffusers.apply_to_diffusers` (tests/test_diffusers_lora.py checks both).
Flux and SD3 (MMDiT) modules get diffusers' transformer names in the PEFT form
(``transformer.context_embedder.lora_A.weight`` / ``lora_B.weight``, no alpha: scale 1), which
diffusers' Flux/SD3 loaders and ComfyUI's LoraLoader both read, when every module of the file has
one; a file with fused layers (a trained edit's ``img_attn.qkv``, ``linear1``) keeps the original
names kohya-style (``lora_unet_double_blocks_0_img_attn_qkv``) for every module.
UNet modules of SD1/SD2/SDXL transformer blocks are named diffusers-style
(``lora_unet_down_blocks_0_attentions_0_…``), which all three hosts read. Other families (the tiny
model, custom layouts), ``unet_names="ldm"`` and files with any UNet weight outside the transformer
blocks (parameter set ``noxattn``) get the LDM names (``lora_unet_input_blocks_1_1_…``) for every
UNet module: ComfyUI and A1111 read them, diffusers' SDXL loader maps them by the UNet's config,
its SD1/SD2 loader refuses them (NoMatchingPeftModuleError).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

from ..arch import UNET_PREFIX, Family
from ..edit import Change, Edit
from ..errors import InvalidInputError
from ..hosts import RunContext

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ARCH_TAG = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
             "sdxl": "stable-diffusion-xl-v1-base", "tiny": "conceptedit-tiny", "flux1": "flux-1-dev",
             "sd3-medium": "stable-diffusion-v3-medium", "sd3.5-large": "stable-diffusion-v3.5-large",
             "tiny-flux": "conceptedit-tiny-flux"}


@dataclass
class LoraExportConfig:
    rank: int = 0                 # cap on the rank per module; 0 = exact low-rank / error-driven SVD
    max_rel_error: float = 0.01   # dense deltas: largest relative Frobenius error allowed by SVD
    dense_as: str = "svd"         # "svd" (lora_up/down) | "diff" (full delta)
    unet_names: str = "auto"      # "auto" | "diffusers" | "ldm"
    dtype: str = "float16"

    def validate(self) -> None:
        if self.rank < 0:
            raise InvalidInputError(f"rank must be ≥ 0 (0 = automatic), got {self.rank}")
        if not (0 <= self.max_rel_error < 1) or not math.isfinite(self.max_rel_error):
            raise InvalidInputError(f"max_rel_error must be in [0, 1), got {self.max_rel_error}")
        if self.dense_as not in ("svd", "diff"):
            raise InvalidInputError(f"dense_as must be 'svd' or 'diff', got {self.dense_as!r}")
        if self.unet_names not in ("auto", "diffusers", "ldm"):
            raise InvalidInputError(f"unet_names must be 'auto', 'diffusers' or 'ldm', got {self.unet_names!r}")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


# Families whose diffusers-style names ComfyUI's own `unet_to_diffusers` map agrees with (checked in
# tests/test_arch.py). The tiny model has a level without res blocks, which that map gets wrong.
_DIFFUSERS_NAMED = ("sd1", "sd2", "sdxl")


def kohya_name(family: Family, key: str, unet_names: str = "auto") -> str:
    if family.is_mmdit and key.startswith(UNET_PREFIX) and unet_names == "peft":
        # Flux/SD3: diffusers' transformer names in the PEFT form (``transformer.context_embedder``),
        # which diffusers' Flux/SD3 loaders and ComfyUI's LoraLoader (its flux/mmdit_to_diffusers map) read
        return family.to_diffusers(key).rsplit(".weight", 1)[0]
    if unet_names == "auto":
        unet_names = "diffusers" if family.name in _DIFFUSERS_NAMED else "ldm"
    if key.startswith(UNET_PREFIX) and unet_names == "diffusers":
        try:
            return family.to_kohya_diffusers_style(key)
        except KeyError:  # a UNet weight outside the transformer-block table: LDM name
            pass
    return family.to_kohya(key)


def file_unet_names(family: Family, keys, unet_names: str = "auto") -> str:
    """The UNet naming of a whole file: "auto" is diffusers-style only when every UNet key of the
    edit has such a name (a transformer-block weight of SD1/SD2/SDXL), else LDM-style for all of them.
    One style per file: diffusers' SDXL loader drops every LDM-named module of a file that also holds
    diffusers-named ones, without a word (its all-LDM files it maps by the UNet config)."""
    if unet_names != "auto":
        return unet_names
    if family.is_mmdit:
        # PEFT names where every UNet key has a diffusers name; else (a fused qkv or linear1 of a
        # trained edit, which diffusers splits into to_q/k/v) the original names, kohya-style
        # (``lora_unet_double_blocks_0_img_attn_qkv``), which ComfyUI and diffusers' kohya-Flux reader take
        for key in keys:
            if key.startswith(UNET_PREFIX):
                try:
                    family.to_diffusers(key)
                except KeyError:
                    return "ldm"
        return "peft"
    if family.name not in _DIFFUSERS_NAMED:
        return "ldm"
    for key in keys:
        if key.startswith(UNET_PREFIX):
            try:
                family.to_kohya_diffusers_style(key)
            except KeyError:
                return "ldm"
    return "diffusers"


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, max_err: float
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """up = U_r √S_r, down = √S_r V_rᵀ, and the relative Frobenius error of dropping the rest."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total == 0:
        r = 1
    elif rank > 0:
        r = min(rank, S.numel())
    else:
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[i] = Σ_{j≥i} s_j²
        ok = (tail / total) <= max_err ** 2
        ok = torch.cat([ok, torch.tensor([True], device=ok.device)])
        r = max(1, int(torch.nonzero(ok)[0]))
    err = math.sqrt(float(energy[r:].sum()) / total) if total > 0 else 0.0
    s = S[:r].sqrt()
    return U[:, :r] * s, s[:, None] * Vh[:r], err


def _factor(change: Change, cfg: LoraExportConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    if change.kind == "lowrank":
        up, down = change.tensors["up"].double(), change.tensors["down"].double()
        if cfg.rank == 0 or up.shape[1] <= cfg.rank:
            return up, down, 0.0
        # SVD of up @ down through its thin factors (never the dense out × d product)
        Qu, Ru = torch.linalg.qr(up)
        Qd, Rd = torch.linalg.qr(down.T)
        U, S, Vh = torch.linalg.svd(Ru @ Rd.T, full_matrices=False)
        a, b, err = _truncate(U, S, Vh, cfg.rank, cfg.max_rel_error)
        return Qu @ a, b @ Qd.T, err
    d = change.delta(dtype=torch.float64).reshape(change.shape[0], -1)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (*_truncate(U, S, Vh, cfg.rank, cfg.max_rel_error),)


def edit_to_lora(edit: Edit, config: LoraExportConfig | None = None,
                 base: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
                 ctx: RunContext | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(kohya state dict, report). `base` gives the base weights, needed only for mask changes."""
    cfg = config or LoraExportConfig()
    cfg.validate()
    ctx = ctx or RunContext()
    edit.check_finite()
    if not edit.changes:
        raise InvalidInputError("the edit changes no weights; there is nothing to export")
    fam = edit.layout()
    unet_names = file_unet_names(fam, edit.changes, cfg.unet_names)
    get = base.get if isinstance(base, Mapping) else base
    dtype = DTYPES[cfg.dtype]
    sd: dict[str, torch.Tensor] = {}
    per_key: dict[str, dict] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    names = set()
    for i, (key, change) in enumerate(edit.changes.items()):
        ctx.report(i, len(edit.changes))
        name = kohya_name(fam, key, unet_names)
        if name in names:
            raise InvalidInputError(f"two weights map to the LoRA module {name}")
        names.add(name)
        if change.kind == "mask" or (change.kind == "delta" and cfg.dense_as == "diff"):
            w = get(key) if (get is not None and change.kind == "mask") else None
            if change.kind == "mask" and w is None:
                raise InvalidInputError(f"{key} is a pruning mask: its LoRA form (−W⊙M) needs the base weights; "
                                        "connect the MODEL (and CLIP for text-encoder masks) to Export LoRA")
            sd[f"{name}.diff"] = change.delta(w, dtype=torch.float32).reshape(change.shape).to(dtype).contiguous()
            per_key[key] = {"module": name, "form": "diff", "rel_error": 0.0}
            continue
        up, down, err = _factor(change, cfg)
        factors[name] = (up.float(), down.float(), change.shape)  # float32 until the file's alpha is known
        per_key[key] = {"module": name, "form": "lora", "rank": up.shape[1], "rel_error": err}
    ctx.report(len(edit.changes), len(edit.changes))
    ranks = [v["rank"] for v in per_key.values() if v["form"] == "lora"]
    # One alpha for the whole file (its largest rank); each module's factors carry √(rank / alpha) each,
    # so the loaders' up · down · alpha / rank is up @ down. Per-module alphas (alpha = rank) read the
    # same in ComfyUI and A1111, but diffusers (0.42) files the alphas of kohya attention modules
    # (attn*.to_q/k/v/out) under names PEFT's alpha_pattern never matches: with mixed ranks those
    # modules would load at the file's most common alpha over their own rank (2x, 0.5x, ...).
    alpha = float(max(ranks, default=1))
    for name, (up, down, shape) in factors.items():
        if unet_names == "peft" and name.startswith("transformer."):
            # PEFT modules carry no alpha: both loaders then scale by 1, so B @ A is the change itself
            sd[f"{name}.lora_B.weight"] = up.reshape(shape[0], -1).to(dtype).contiguous()
            sd[f"{name}.lora_A.weight"] = down.reshape(up.shape[1], *shape[1:]).to(dtype).contiguous()
            continue
        r = up.shape[1]
        c = math.sqrt(r / alpha)
        sd[f"{name}.lora_up.weight"] = (up * c).reshape(shape[0], r, *([1] * (len(shape) - 2))).to(dtype).contiguous()
        sd[f"{name}.lora_down.weight"] = (down * c).reshape(r, *shape[1:]).to(dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    errs = [v["rel_error"] for v in per_key.values()]
    report = {"modules": len(per_key), "lora_modules": len(ranks), "diff_modules": len(per_key) - len(ranks),
              "max_rank": max(ranks, default=0), "max_rel_error": max(errs, default=0.0),
              "mean_rel_error": sum(errs) / max(len(errs), 1), "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
              "per_key": per_key}
    return sd, report


def lora_metadata(edit: Edit, cfg: LoraExportConfig, report: Mapping) -> dict[str, str]:
    """Header fields A1111 and the kohya tools display, plus where the file came from."""
    tag = _ARCH_TAG.get(edit.family, edit.family)
    info = {"method": edit.method, "family": edit.family, "concepts": edit.concepts, "params": edit.params,
            "fingerprint": edit.fingerprint, "metrics": edit.metrics, "export": asdict(cfg),
            "max_rel_error": report["max_rel_error"]}
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(report["max_rank"]),
            "ss_network_alpha": str(report["max_rank"]), "modelspec.architecture": f"{tag}/lora",
            "modelspec.title": f"ConceptEdit {edit.method}: {', '.join(edit.concepts)[:200]}",
            "conceptedit_source": json.dumps(info, default=str)}


def save_lora(edit: Edit, path: str | os.PathLike, config: LoraExportConfig | None = None,
              base: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
              ctx: RunContext | None = None) -> dict:
    """Write the LoRA file (atomically) and return the export report (ranks, errors, size)."""
    from safetensors.torch import save_file
    cfg = config or LoraExportConfig()
    sd, report = edit_to_lora(edit, cfg, base, ctx)
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=lora_metadata(edit, cfg, report))
    os.replace(tmp, path)
    report["path"] = path
    log.info("LoRA %s: %d modules (%d diff), max rank %d, max relative error %.2g, %.1f MB", os.path.basename(path),
             report["modules"], report["diff_modules"], report["max_rank"], report["max_rel_error"], report["bytes"] / 1e6)
    return report
