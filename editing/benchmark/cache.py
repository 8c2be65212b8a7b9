"""Benchmark results on disk, one small file per (model, edit, prompt, seed, settings, what).

Each entry carries its full key and a digest of its value: an entry whose key is not the one asked
for (a foreign or renamed file) or whose digest does not match (a torn or corrupt file) is refused,
counted and recomputed, never used. Writes go to a temporary file in the same folder and are moved
into place, so a run stopped at any point leaves only whole entries, and a rerun resumes from them.
The original model's entries are keyed by its fingerprint and "original", so every edit of that
model shares them. Pictures are entries of `editing.distributed`'s checked cache (`save_checked`,
`read_checked`), the format of EMCID's and ConceptPrune's caches; judge results are JSON files with
the same checks, written the same way (`atomic_write`)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..distributed import atomic_write, read_checked, save_checked, tensor_bytes

log = logging.getLogger(__name__)

FORMAT = "conceptedit-benchmark-cache"
VERSION = 1         # judge results (JSON)
PICTURE_VERSION = 2  # pictures: `distributed.save_checked` entries (1: the cache's own format, refused)


def canonical(parts: Mapping[str, Any]) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def edit_fingerprint(edit, strength: float = 1.0) -> str:
    """A hash of everything an edit changes (its tensors and metadata) and the strength it is applied at."""
    tensors, meta = edit.to_tensors()
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(f"{k}|".encode() + tensor_bytes(tensors[k]))
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
        atomic_write(path, data)
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
        got = read_checked(path, parts)
        if isinstance(got, str) or got is None:
            self._refuse(path, got or "disappeared")
            return None
        tensors, meta = got
        ok_format = meta.get("format") == FORMAT and meta.get("version") == str(PICTURE_VERSION) and "x" in tensors
        return tensors["x"] if self._accept(path, ok_format, True, True) else None

    def put_tensor(self, parts: Mapping[str, Any], tensor: torch.Tensor) -> None:
        if self.root is None:
            return
        save_checked(self._path(parts, ".safetensors"), {"x": tensor}, parts,
                     {"format": FORMAT, "version": str(PICTURE_VERSION)})
        self.written += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "refused": self.refused, "written": self.written}
