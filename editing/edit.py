"""An edit is data: per-key weight changes plus metadata, saved as safetensors.

Three kinds of change per key (ComfyUI patch keys, see `editing.arch`):
- ``delta``: a dense ΔW;
- ``lowrank``: ΔW = up @ down (exact for UCE/EMCID edits of small rank);
- ``mask``: W' = W ⊙ (1 − M), stored as the flat indices of M's ones (ConceptPrune).
`Edit.deltas(base)` turns every entry into a dense ΔW against the base weights, which is what a
host adds with a strength (strength 0 is exactly the original; 1 is the edit).
Which keys and kinds each method may hold is `editing.scope`; files are checked against it on load.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .arch import UNET_PREFIX
from .errors import EditFileError, FingerprintMismatchError, NonFiniteError
from .scope import check_scope, tensor_problem

log = logging.getLogger(__name__)

FORMAT = "conceptedit.edit"
FORMAT_VERSION = 1
_SEP = "::"


@dataclass
class Change:
    kind: str                   # "delta" | "lowrank" | "mask"
    shape: tuple[int, ...]      # shape of the weight it changes
    tensors: dict[str, torch.Tensor]  # delta: {"delta"}; lowrank: {"up","down"}; mask: {"index"}

    def __post_init__(self):
        need = {"delta": {"delta"}, "lowrank": {"up", "down"}, "mask": {"index"}}.get(self.kind)
        if need is None:
            raise EditFileError(f"unknown change kind {self.kind!r}")
        if set(self.tensors) != need:
            raise EditFileError(f"a {self.kind} change needs tensors {sorted(need)}, got {sorted(self.tensors)}")
        self.shape = tuple(int(s) for s in self.shape)
        problem = tensor_problem(self.kind, self.tensors)
        if problem:
            raise EditFileError(f"a {self.kind} change: {problem}")
        self._check_shapes()

    def _check_shapes(self):
        t = self.tensors
        if self.kind == "delta" and tuple(t["delta"].shape) != self.shape:
            raise EditFileError(f"delta of shape {tuple(t['delta'].shape)} for a weight of shape {self.shape}")
        if self.kind == "lowrank":
            up, down = t["up"], t["down"]
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or \
                    (up.shape[0], down.shape[1]) != self.shape[:2] or \
                    up.shape[0] * down.shape[1] != math.prod(self.shape):
                raise EditFileError(f"low-rank pair {tuple(up.shape)} @ {tuple(down.shape)} does not make {self.shape}")
        if self.kind == "mask":
            idx = t["index"]
            n = math.prod(self.shape)
            if idx.ndim != 1:
                raise EditFileError(f"a mask's index must be a 1-D tensor of flat positions, "
                                    f"got shape {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise EditFileError(f"mask index out of range for a weight of shape {self.shape}")

    @property
    def rank(self) -> int | None:
        return int(self.tensors["up"].shape[1]) if self.kind == "lowrank" else None

    def mask(self, device=None) -> torch.Tensor:
        """The boolean mask M (True = pruned) of a mask change."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=device).reshape(-1)
        m[self.tensors["index"].to(device=device, dtype=torch.long)] = True
        return m.reshape(self.shape)

    def delta(self, base: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
        """Dense ΔW. Masks need the base weight W (ΔW = −W ⊙ M)."""
        if self.kind == "delta":
            return self.tensors["delta"].to(device=device, dtype=dtype)
        if self.kind == "lowrank":
            up = self.tensors["up"].to(device=device, dtype=torch.float32)
            down = self.tensors["down"].to(device=device, dtype=torch.float32)
            return (up @ down).reshape(self.shape).to(dtype=dtype)
        if base is None:
            raise ValueError("a mask change needs the base weight to make a delta")
        w = base.detach().to(device=device)
        return torch.where(self.mask(device=w.device), -w, torch.zeros((), dtype=w.dtype, device=w.device)).to(dtype=dtype or w.dtype)

    def sparse_delta(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW = −W ⊙ M of a mask change as a sparse COO tensor (same dtype and device as W)."""
        idx = self.tensors["index"].to(device=base.device, dtype=torch.long)
        flat = base.detach().reshape(-1)
        coords = torch.stack([idx // self.shape[1], idx % self.shape[1]]) if len(self.shape) == 2 else idx[None]
        return torch.sparse_coo_tensor(coords, -flat[idx], self.shape, dtype=base.dtype, device=base.device,
                                       check_invariants=True).coalesce()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Edit:
    """The result of every method. `changes` is keyed by ComfyUI patch key."""

    method: str
    family: str
    changes: dict[str, Change]
    concepts: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- inspection ------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        per_key = {}
        for k, c in self.changes.items():
            if c.kind == "mask":
                n = 1
                for s in c.shape:
                    n *= s
                per_key[k] = {"kind": "mask", "pruned_fraction": c.tensors["index"].numel() / n}
            elif c.kind == "lowrank":
                per_key[k] = {"kind": "lowrank", "rank": c.rank,
                              "norm": float(c.delta(dtype=torch.float32).norm())}
            else:
                per_key[k] = {"kind": "delta", "norm": float(c.tensors["delta"].float().norm())}
        return {"method": self.method, "family": self.family, "concepts": self.concepts,
                "params": self.params, "fingerprint": self.fingerprint, "metrics": self.metrics,
                "keys": per_key}

    def layout(self):
        """The layout this edit's keys describe (`editing.arch.layout_of_edit`): the family table's
        when it has one, else read from the keys and the fingerprint's text encoders."""
        from .arch import layout_of_edit
        encoders = [e for e in str(self.fingerprint.get("encoders", "")).split(",") if e]
        return layout_of_edit(self.family, {k: c.shape for k, c in self.changes.items()}, encoders)

    def text_encoder_keys(self) -> list[str]:
        """Keys this edit changes outside the UNet (text-encoder weights, e.g. EMCID's fc2)."""
        return [k for k in self.changes if not k.startswith(UNET_PREFIX)]

    def unet_part(self) -> "Edit":
        """The same edit restricted to its UNet keys (what hooks on the diffusion model can carry)."""
        return Edit(self.method, self.family, {k: c for k, c in self.changes.items() if k.startswith(UNET_PREFIX)},
                    concepts=list(self.concepts), params=self.params, fingerprint=dict(self.fingerprint))

    def check_scope(self, source: str = "") -> None:
        """Raise EditFileError unless every change is one this edit's method makes (`editing.scope`)."""
        check_scope(self.method, self.params, self.changes, source)

    def check_finite(self) -> None:
        for k, c in self.changes.items():
            for name, t in c.tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"the {self.method} edit has NaN/Inf in {k} ({name}); nothing was applied. "
                                         "Lower the scales or raise λ, and check the model itself has finite weights.")

    def deltas(self, base: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
               dtype=None, device=None) -> dict[str, torch.Tensor]:
        """Dense ΔW per key. `base` gives base weights (needed for masks)."""
        get = base.get if isinstance(base, Mapping) else base
        out = {}
        for k, c in self.changes.items():
            out[k] = c.delta(get(k) if (c.kind == "mask" and get is not None) else None, dtype=dtype, device=device)
        return out

    # ---- validation against a model ---------------------------------------------------------
    def validate_for(self, family_name: str, shapes: Mapping[str, tuple[int, ...]],
                     fingerprint: Mapping[str, str] | None = None, strict_weights: bool = False) -> list[str]:
        """Raise if this edit cannot apply to a model of `family_name` with these weight shapes.

        Returns warnings (e.g. same layout, different checkpoint)."""
        warnings = []
        if family_name != self.family:
            from .arch import family_label
            made, have = family_label(self.family), family_label(family_name)
            raise FingerprintMismatchError(
                f"this {self.method} edit was computed for {made}; the model is {have}. "
                f"Load a {made} checkpoint, or recompute the edit on this model.")
        if fingerprint and self.fingerprint:
            # layout hashes are comparable only when made the same way (version 2: the UNet's
            # discovered editable keys); every key's shape is checked below either way
            same_kind = fingerprint.get("layout_version") == self.fingerprint.get("layout_version")
            if same_kind and fingerprint.get("layout") != self.fingerprint.get("layout"):
                raise FingerprintMismatchError(
                    f"this edit was made for a {self.family} model with a different layout "
                    f"({self.fingerprint.get('layout')} vs {fingerprint.get('layout')}); recompute it on this model.")
            if fingerprint.get("weights") != self.fingerprint.get("weights"):
                msg = ("this edit was computed on a different checkpoint of the same family; "
                       "it applies, but its effect was measured on the other model")
                if strict_weights:
                    raise FingerprintMismatchError(msg)
                warnings.append(msg)
        for k, c in self.changes.items():
            have_shape = shapes.get(k)
            if have_shape is None:
                raise FingerprintMismatchError(f"the edit changes {k}, which this model does not have")
            if tuple(have_shape) != c.shape:
                raise FingerprintMismatchError(f"{k}: the edit is for shape {c.shape}, the model has {tuple(have_shape)}")
        return warnings

    # ---- files --------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {}
        entries = {}
        for k, c in self.changes.items():
            entries[k] = {"kind": c.kind, "shape": list(c.shape)}
            for name, t in c.tensors.items():
                tensors[f"{k}{_SEP}{name}"] = t.detach().contiguous().cpu()
        meta = {"format": FORMAT, "version": self.version, "method": self.method, "family": self.family,
                "concepts": self.concepts, "params": self.params, "fingerprint": self.fingerprint,
                "metrics": self.metrics, "entries": entries}
        return tensors, {"conceptedit": json.dumps(meta, default=_json_default),
                         "modelspec.title": f"ConceptEdit {self.method}: {', '.join(self.concepts)[:200]}"}

    def save(self, path: str | os.PathLike) -> str:
        from safetensors.torch import save_file
        self.check_finite()
        self.check_scope()  # never write a file that loading would refuse
        tensors, meta = self.to_tensors()
        path = os.fspath(path)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # never leave a half-written edit under the real name
        return path

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str = "") -> "Edit":
        raw = metadata.get("conceptedit") if metadata else None
        if raw is None:
            raise EditFileError(f"{source or 'this file'} is not a ConceptEdit edit (no 'conceptedit' metadata). "
                                "If it is a LoRA, load it with ComfyUI's LoraLoader instead.")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EditFileError(f"{source}: broken ConceptEdit metadata ({e})") from None
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
            raise EditFileError(f"{source}: edit format {meta.get('format')} v{meta.get('version')} is not one this "
                                f"ConceptEdit reads (v{FORMAT_VERSION}); update the pack")
        changes = {}
        entries = meta.get("entries", {})
        for k, e in entries.items():
            names = {"delta": ["delta"], "lowrank": ["up", "down"], "mask": ["index"]}.get(e.get("kind"))
            if names is None:
                raise EditFileError(f"{source}: unknown change kind {e.get('kind')!r} for {k}")
            try:
                ts = {n: tensors[f"{k}{_SEP}{n}"] for n in names}
            except KeyError as missing:
                raise EditFileError(f"{source}: tensor {missing} listed in the metadata is missing") from None
            try:
                changes[k] = Change(e["kind"], tuple(e["shape"]), ts)
            except EditFileError as err:
                raise EditFileError(f"{source}: {k}: {err}; nothing was applied") from None
        extra = set(tensors) - {f"{k}{_SEP}{n}" for k, c in changes.items() for n in c.tensors}
        if extra:
            raise EditFileError(f"{source}: tensors not described by the metadata: {sorted(extra)[:3]}")
        for name in ("method", "family"):
            if not isinstance(meta.get(name), str):
                raise EditFileError(f"{source}: the metadata names no {name}; this is not a complete ConceptEdit edit")
        params = meta.get("params", {})
        check_scope(meta["method"], params, changes, source)
        return cls(method=meta["method"], family=meta["family"], changes=changes, concepts=list(meta.get("concepts", [])),
                   params=params, fingerprint=meta.get("fingerprint", {}),
                   metrics=meta.get("metrics", {}), version=int(meta.get("version", FORMAT_VERSION)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Edit":
        """Load an edit file. Only safetensors: nothing is unpickled."""
        from safetensors import safe_open
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise EditFileError(f"{path}: ConceptEdit reads only .safetensors edit files")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise EditFileError(f"{path}: not a readable safetensors file ({e})") from e
        edit = cls.from_tensors(tensors, meta, source=path)
        edit.check_finite()
        return edit


def combine(edits: list[tuple[Edit, float]]) -> Edit:
    """Stack several edits into one (per-edit strength), for saving or exporting together.

    Changes to the same key add up as dense deltas; masks combine by union when strengths are 1.
    """
    if not edits:
        raise ValueError("nothing to combine")
    fam = {e.family for e, _ in edits}
    if len(fam) != 1:
        raise FingerprintMismatchError(f"cannot combine edits for different families: {sorted(fam)}")
    changes: dict[str, Change] = {}
    for e, s in edits:
        for k, c in e.changes.items():
            if c.kind == "mask" and s == 1.0 and (k not in changes or changes[k].kind == "mask"):
                idx = c.tensors["index"].long()
                if k in changes:
                    idx = torch.unique(torch.cat([changes[k].tensors["index"].long(), idx]))
                changes[k] = Change("mask", c.shape, {"index": idx})
                continue
            if c.kind == "mask":
                raise ValueError("a mask can be combined only at strength 1 with other masks")
            d = s * c.delta(dtype=torch.float32)
            if k in changes:
                if changes[k].kind == "mask":
                    raise ValueError(f"{k}: cannot add a delta to a mask without the base weights")
                d = d + changes[k].delta(dtype=torch.float32)
            changes[k] = Change("delta", c.shape, {"delta": d})
    first = edits[0][0]
    return Edit(method="+".join(e.method for e, _ in edits), family=first.family, changes=changes,
                concepts=[c for e, _ in edits for c in e.concepts],
                params={"combined": [{"method": e.method, "strength": s, "params": e.params} for e, s in edits]},
                fingerprint=first.fingerprint)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
