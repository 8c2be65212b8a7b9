"""Work split over processes (`torchrun`, one process per GPU, on one or many machines) and the
on-disk cache that lets a stopped run resume.

Every function here is a no-op, or the identity, when no process group is set up (a single process,
the ComfyUI nodes): the methods call them unconditionally. The CLI sets the group up from the
environment torchrun exports (`init_from_env`: NCCL on GPUs, gloo on CPUs) and tears it down at exit.

What the methods share over processes: which items are theirs (`shard_indices`: item i belongs to
rank i mod world, the same split on every rank), sums of statistics (`all_reduce_sum`, in float64),
per-item results that each rank computed for its own items (`assemble`, `assemble_bytes`, `gather_json`:
exact, every rank gets every row), cached items any rank holds (`share_held`: from the lowest such
rank) and tensors one rank made (`broadcast`). Only tensors travel, never
pickled objects, so gloo (CPU) and NCCL (GPU) both carry them.

The cache (`save_checked` / `load_checked`): one safetensors file per finished piece of work (a
stage-1 concept, a batch of calibration prompts), written to a temporary name and renamed, so a
process killed mid-write leaves no half file under the real name. Each file carries the full text
of its key (what model, settings and item it was computed for) and a SHA-256 of its tensors; a file
whose key differs (a foreign entry under the name) or whose tensors do not hash to it (corrupt) is
refused with a warning and its work done again, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)


# ---- rank and world ---------------------------------------------------------------------------------
def _dist():
    d = getattr(torch, "distributed", None)
    return d if d is not None and d.is_available() else None


def active() -> bool:
    """Whether a process group of more than one process is set up."""
    d = _dist()
    return d is not None and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes results."""
    return rank() == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun exports them (RANK, WORLD_SIZE, LOCAL_RANK);
    (0, 1, 0) outside torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def init_from_env(cpu: bool = False) -> bool:
    """Set up the default process group when torchrun started this process with WORLD_SIZE > 1:
    NCCL with this process's GPU (LOCAL_RANK) where CUDA is present and `cpu` is not asked, else
    gloo. Returns whether a group is (now) set up. Call before the model loads, so that it loads on
    this process's GPU."""
    d = _dist()
    r, n, local = env_world()
    if d is None or n <= 1:
        return False
    if d.is_initialized():
        return True
    gpu = torch.cuda.is_available() and not cpu
    if gpu:
        torch.cuda.set_device(local)
    d.init_process_group(backend="nccl" if gpu else "gloo", **({"device_id": torch.device("cuda", local)} if gpu
                                                                 and _takes_device_id(d) else {}))
    log.info("distributed: process %d of %d (%s)", d.get_rank(), d.get_world_size(), d.get_backend())
    return True


def _takes_device_id(d) -> bool:
    import inspect
    return "device_id" in inspect.signature(d.init_process_group).parameters


def shutdown() -> None:
    """Tear the process group down (what `init_from_env` set up); nothing without one."""
    d = _dist()
    if d is not None and d.is_initialized():
        d.destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


def _device() -> torch.device:
    """Where collectives run: NCCL only carries CUDA tensors, gloo CPU ones."""
    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- splitting work ---------------------------------------------------------------------------------
def shard_indices(n: int, of_rank: int | None = None, size: int | None = None) -> list[int]:
    """The indices among range(n) that rank `of_rank` (default: this one) handles: i mod world =
    rank. Deterministic by index, so every rank agrees on everyone's share without talking."""
    r = rank() if of_rank is None else of_rank
    w = world() if size is None else size
    return list(range(r, n, w))


def shard(items: Sequence) -> list:
    """This rank's items of `items` (`shard_indices`); all of them in a single process."""
    return [items[i] for i in shard_indices(len(items))]


# ---- collectives ------------------------------------------------------------------------------------
def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The sums over all ranks of each tensor, in float64 (one flat all-reduce for all of them), on
    each tensor's own device. In a single process: the tensors in float64."""
    if not active():
        return [t.double() for t in tensors]
    dev = _device()
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors]) if tensors else \
        torch.zeros(0, dtype=torch.float64, device=dev)
    _dist().all_reduce(flat)
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.device) for p, t in zip(parts, tensors)]


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over all ranks of an integer tensor (the tensor itself in a single process)."""
    if not active():
        return values
    flat = values.detach().to(_device(), torch.int64).clone()
    _dist().all_reduce(flat, op=_dist().ReduceOp.MAX)
    return flat.to(values.device)


class RowParallel:
    """Data-parallel training over the rows of a batch that every process draws alike (the same
    generator, the same draws): each process computes the loss of its share of the rows, weighted by
    that share so the shares add up to the batch mean, and the gradients are summed over the
    processes in float64 before the step. Every process then takes the step one process takes on
    the whole batch, which is what DistributedDataParallel does for these parameters, without
    wrapping a module the host owns. Off (one process, or `on=False`): the whole batch, no exchange.

    A process without rows (a batch smaller than the world) contributes zero gradients."""

    def __init__(self, on: bool | None = None):
        self.on = active() if on is None else on

    def part(self, n: int) -> tuple[torch.Tensor | slice, float]:
        """(the rows of an n-row batch this process computes, their share of the batch mean)."""
        if not self.on:
            return slice(None), 1.0
        pos = shard_indices(n)
        return torch.tensor(pos, dtype=torch.long), len(pos) / n

    @staticmethod
    def scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
        return loss if share == 1.0 else loss * share

    def gradients(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients summed over the processes (one float64 all-reduce), in their own dtypes."""
        if not self.on:
            return list(grads)
        return [s.to(g.dtype) for s, g in zip(all_reduce_sum(grads), grads)]

    def sync(self, params: Sequence[torch.Tensor]) -> None:
        """`gradients` on the parameters' `.grad` in place. A parameter no process has a gradient
        for keeps None, so an optimiser skips it as it does in one process."""
        if not self.on:
            return
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        summed = self.gradients(grads + [have])
        for p, s, n in zip(params, summed, summed[-1].tolist()):
            p.grad = s if n > 0 else None

    def step(self, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], loss: torch.Tensor | None,
             share: float, terms: Sequence[torch.Tensor] = ()) -> list[float]:
        """One optimiser step on this process's share of a batch (`loss`: the mean over its rows, None
        without rows): the gradients of `scaled(loss)`, summed over the processes (`sync`), then
        `opt.step()`. Returns the batch's loss and `terms` (each a mean over the same rows), summed
        over the processes (`total`)."""
        opt.zero_grad(set_to_none=True)
        if loss is not None:
            self.scaled(loss, share).backward()
        self.sync(params)
        opt.step()
        mine = [float(v.detach()) * share if loss is not None else 0.0 for v in (loss, *terms)]
        return self.total(mine)

    def total(self, values: Sequence[float]) -> list[float]:
        """Per-process loss values (already weighted by their share) summed over the processes."""
        if not self.on:
            return [float(v) for v in values]
        return [float(v) for v in all_reduce_sum([torch.tensor(values, dtype=torch.float64)])[0]]


def assemble(n: int, rows: Mapping[int, torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    """[n, *shape]: row i from the rank that holds `rows[i]` (each index held by exactly one rank).
    Exact: every other rank adds zeros. `like` gives the shape and dtype where this rank holds no row;
    every rank must pass the same shape. Returned on the CPU (or `like`'s device in one process)."""
    sample = next(iter(rows.values()), like)
    if sample is None:
        raise ValueError("assemble needs a row or `like` to know the shape")
    dtype = sample.dtype if sample.is_floating_point() else torch.int64
    out = torch.zeros((n, *sample.shape), dtype=torch.float64 if active() else dtype, device=_device())
    for i, t in rows.items():
        out[i] = t.detach().to(out.device, out.dtype)
    if active():
        _dist().all_reduce(out)
    return out.to(dtype).cpu() if active() else out.to(sample.device)


def assemble_bytes(n: int, items: Mapping[int, bytes]) -> list[bytes]:
    """`assemble` for byte strings (JSON of per-item metadata): item i from the rank that holds it."""
    lengths = assemble(n, {i: torch.tensor(len(b)) for i, b in items.items()}, like=torch.tensor(0))
    width = int(lengths.max()) if n else 0
    rows = {i: torch.tensor(list(b) + [0] * (width - len(b)), dtype=torch.int64) for i, b in items.items()}
    table = assemble(n, rows, like=torch.zeros(width, dtype=torch.int64))
    return [bytes(table[i, :int(lengths[i])].to(torch.uint8).tolist()) for i in range(n)]


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's byte string, in rank order, on every rank: one `broadcast` per rank, so each
    string travels once at its own length (`assemble_bytes` pads every row to the longest). A single
    process gets [data]."""
    if not active():
        return [data]
    out = []
    for src in range(world()):
        # a length prefix keeps the tensor non-empty for an empty string
        mine = torch.frombuffer(bytearray(len(data).to_bytes(8, "little") + data), dtype=torch.uint8) \
            if src == rank() else None
        got = broadcast(mine, src).cpu().numpy().tobytes()
        out.append(got[8:8 + int.from_bytes(got[:8], "little")])
    return out


def gather_json(items: Mapping[int, object]) -> dict[int, object]:
    """Per-item results that each rank computed for its own items (JSON-serialisable values, each
    index held by one rank), all of them on every rank. JSON writes floats by repr (NaN and ±inf
    included), so they come back exactly. A single process gets its own items."""
    if not active():
        return dict(items)
    blobs = all_gather_bytes(json.dumps({str(i): v for i, v in items.items()}).encode())
    out: dict[int, object] = {}
    for blob in blobs:
        out.update({int(k): v for k, v in json.loads(blob.decode()).items()})
    return out


def first_holders(n: int, held: Iterable[int]) -> list[int | None]:
    """For each of n items, the lowest rank that holds it (`held`: this rank's items), None where no
    rank does: which copy of a cached entry to use when machines do not share a file system."""
    if not active():
        mine = set(held)
        return [0 if i in mine else None for i in range(n)]
    w, r = world(), rank()
    # the lowest holder has the highest (world - rank): one max over the ranks finds it
    score = torch.zeros(n, dtype=torch.int64)
    for i in held:
        score[i] = w - r
    top = all_reduce_max(score)
    return [w - int(v) if int(v) > 0 else None for v in top]


def share_held(n: int, held: Mapping[int, object]) -> dict[int, object]:
    """The items (JSON-serialisable values) that any rank holds, each taken from the lowest rank
    holding it, on every rank: what a restarted run reads from the caches of all its processes."""
    owners = first_holders(n, list(held))
    r = rank()
    return gather_json({i: v for i, v in held.items() if owners[i] == r})


def broadcast(tensor: torch.Tensor | None, src: int = 0) -> torch.Tensor | None:
    """Rank `src`'s tensor on every rank (others pass None or anything: its shape and dtype are sent
    first). A single process gets its own tensor back."""
    if not active():
        return tensor
    d, dev = _dist(), _device()
    codes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
             torch.uint8]
    head = torch.full((10,), -1, dtype=torch.int64, device=dev)
    if rank() == src and tensor is not None:
        if tensor.ndim > 8:
            raise ValueError("broadcast carries tensors of at most 8 dimensions")
        head[0] = codes.index(tensor.dtype)
        head[1] = tensor.ndim
        head[2:2 + tensor.ndim] = torch.tensor(tensor.shape, dtype=torch.int64)
    d.broadcast(head, src)
    if int(head[0]) < 0:
        return None
    shape = tuple(int(v) for v in head[2:2 + int(head[1])])
    dtype = codes[int(head[0])]
    carrier = dtype if dtype not in (torch.bool, torch.bfloat16) or dev.type == "cuda" else torch.float32
    buf = (tensor.detach().to(dev, carrier).contiguous() if rank() == src
           else torch.empty(shape, dtype=carrier, device=dev))
    d.broadcast(buf, src)
    home = tensor.device if rank() == src else torch.device("cpu")
    return buf.to(home, dtype)


# ---- the resumable cache ------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and raw bytes of a tensor: what a digest or fingerprint of it hashes."""
    t = t.detach().contiguous().cpu()
    # flattened first: a "contiguous" tensor may still have a size-1 last dimension with a stride other
    # than 1 (a transposed column, as EMCID's factors are), which a byte view refuses
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return f"{t.dtype}|{tuple(t.shape)}|".encode() + raw


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}|".encode() + tensor_bytes(tensors[name]))
    return h.hexdigest()


def _jsonable(o):
    try:
        return list(o)   # sets, key views, other iterables
    except TypeError:
        return str(o)    # anything else a key names by its text


def key_text(key: Mapping) -> str:
    """The canonical text of a cache key (what an entry was computed for)."""
    return json.dumps(key, sort_keys=True, default=_jsonable)


def key_name(key: Mapping, length: int = 24) -> str:
    """A file-name-safe hash of a cache key."""
    return hashlib.sha256(key_text(key).encode()).hexdigest()[:length]


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to a temporary file of this process in `path`'s folder, then rename it over `path`
    (atomic on one file system: a reader sees the old file, the new one or none; a process killed
    mid-write leaves only a `.tmp-` file)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checked(path: str, tensors: Mapping[str, torch.Tensor], key: Mapping,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a cache entry: `tensors` (contiguous CPU copies), the key's text and the tensors'
    digest, atomically (`atomic_write`)."""
    from safetensors.torch import save
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta.update(key=key_text(key), sha256=tensor_digest(data))
    atomic_write(path, save(data, metadata=meta))


def read_checked(path: str, key: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, str]] | str | None:
    """(tensors, metadata) of the entry at `path` when it was computed for `key` and its tensors are
    intact; None when there is no file; else why it is refused (a foreign or corrupt entry)."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged header or body
        return f"is unreadable ({err})"
    if meta.get("key") != key_text(key):
        return "was computed for something else (another model, settings or item)"
    if meta.get("sha256") != tensor_digest(tensors):
        return "does not match its checksum (corrupt)"
    return tensors, meta


def load_checked(path: str, key: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """`read_checked`, with a refused entry named in a warning and None returned, so its work is
    done again and the entry rewritten; it is never used."""
    got = read_checked(path, key)
    if isinstance(got, str):
        log.warning("cache entry %s %s: refused, computing it again", path, got)
        return None
    return got
