"""Benchmark results on disk, one small file per (model, edit, prompt, seed, settings, what).

Each entry carries its full key and a digest of its value: an entry whose key is not the one asked
for (a foreign or renamed file) or whose digest does not match (a torn or corrupt file) is refused,
counted and recomputed, never used. Writes go to a temporary file in the same folder and are moved
into place, so a run stopped at any point leaves only whole entries, and a rerun resumes from them.
The original model's entries are keyed by its fingerprint and "original", so every edit of that
model shares them."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = "conceptedit-benchmark-cache"
VERSION = 1


def canonical(parts: Mapping[str, Any]) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def edit_fingerprint(edit, strength: float = 1.0) -> str:
    """A hash of everything an edit changes (its tensors and metadata) and the strength it is applied at."""
    tensors, meta = edit.to_tensors()
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(f"{k}|".encode() + _tensor_bytes(tensors[k]))
    h.update(canonical(meta).encode())
    h.update(repr(float(strength)).encode())
    return h.hexdigest()[:24]


class ResultCache:
    """JSON values and tensors under `root` (None: nothing is kept, everything is computed)."""

    def __init__(self, root: str | None):
        self.root = os.fspath(root) if root else None
        self.hits = self.misses = self.refused = self.written = 0

    def _path(self, parts: Mapping[str, Any], ext: str) -> str:
        h = digest(canonical(parts))
        return os.path.join(self.root, h[:2], h + ext)

    def _write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.splitext(path)[1])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.written += 1

    def _refuse(self, path: str, why: str) -> None:
        self.refused += 1
        log.warning("benchmark cache: %s %s; recomputing it", path, why)

    def _existing(self, parts: Mapping[str, Any], ext: str) -> str | None:
        """The entry's path when its file exists (else None, a miss counted when there is a cache)."""
        if self.root is None:
            return None
        path = self._path(parts, ext)
        if os.path.isfile(path):
            return path
        self.misses += 1
        return None

    def _accept(self, path: str, ok_format: bool, ok_key: bool, ok_digest: bool) -> bool:
        """A read entry is used only when its format, key and digest all match; else it is refused."""
        why = ("is not an entry of this cache format" if not ok_format else "belongs to another key" if not ok_key
               else "does not match its digest" if not ok_digest else None)
        if why is None:
            self.hits += 1
            return True
        self._refuse(path, why)
        return False

    # ---- JSON values (judge results) ------------------------------------------------------
    def get_json(self, parts: Mapping[str, Any]) -> Any | None:
        path = self._existing(parts, ".json")
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                entry = json.loads(f.read().decode("utf-8"))
            ok_format = entry.get("format") == FORMAT and entry.get("version") == VERSION
            value = entry["value"]
        except Exception:  # unreadable, not JSON, not an object: a corrupt entry
            self._refuse(path, "is not a readable entry")
            return None
        ok = self._accept(path, ok_format, canonical(entry.get("key", {})) == canonical(parts),
                          entry.get("digest") == digest(canonical({"value": value})))
        return value if ok else None

    def put_json(self, parts: Mapping[str, Any], value: Any) -> Any:
        """Stores `value` (when there is a cache) and returns it as a reader gets it back, so a cold
        and a warm run report the same."""
        text = canonical({"value": value})
        value = json.loads(text)["value"]
        if self.root is not None:
            entry = {"format": FORMAT, "version": VERSION, "key": json.loads(canonical(parts)),
                     "digest": digest(text), "value": value}
            self._write(self._path(parts, ".json"), json.dumps(entry).encode("utf-8"))
        return value

    def adopt_json(self, parts: Mapping[str, Any], value: Any) -> None:
        """Keep a value another process computed or read (torchrun), unless an entry is already under
        its name: with a shared cache folder that process wrote it, and it is not written twice."""
        if self.root is not None and not os.path.isfile(self._path(parts, ".json")):
            self.put_json(parts, value)

    # ---- tensors (generated pictures) -----------------------------------------------------
    def get_tensor(self, parts: Mapping[str, Any]) -> torch.Tensor | None:
        path = self._existing(parts, ".safetensors")
        if path is None:
            return None
        from safetensors.torch import load
        try:
            with open(path, "rb") as f:
                data = f.read()
            tensor = load(data)["x"]
            meta = _metadata(data)
        except Exception:
            self._refuse(path, "is not a readable safetensors entry")
            return None
        ok = self._accept(path, meta.get("format") == FORMAT and meta.get("version") == str(VERSION),
                          meta.get("key") == canonical(parts), meta.get("digest") == _tensor_digest(tensor))
        return tensor if ok else None

    def put_tensor(self, parts: Mapping[str, Any], tensor: torch.Tensor) -> None:
        if self.root is None:
            return
        from safetensors.torch import save
        t = tensor.detach().contiguous().cpu()
        meta = {"format": FORMAT, "version": str(VERSION), "key": canonical(parts), "digest": _tensor_digest(t)}
        self._write(self._path(parts, ".safetensors"), save({"x": t}, metadata=meta))

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "refused": self.refused, "written": self.written}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and raw bytes: what the edit fingerprint and an entry's digest hash."""
    t = t.detach().contiguous().cpu()
    # flattened first: a "contiguous" tensor may still have a size-1 last dimension with a stride other
    # than 1 (a transposed column, as EMCID's factors are), which a byte view refuses
    return f"{t.dtype}|{tuple(t.shape)}|".encode() + (t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _tensor_digest(t: torch.Tensor) -> str:
    return digest(_tensor_bytes(t))


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__", {}) or {}
