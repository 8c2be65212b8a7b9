"""Memory of an edit's patches on the real SDXL UNet: dense ΔW per weight vs ComfyUI's own LoRA form.

Two rank-r edits (default r = 4):
- UCE-like: every cross-attention K and V (attn2.to_k / to_v, 140 weights on SDXL);
- unlearning: a LoRA on the parameter set 'lora' (every Linear inside the transformer blocks, what
  `editing.training.select_targets` trains).
Each is turned into patches by `comfy_host.patches.edit_patches` (ComfyUI's `comfy.lora.load_lora`)
and added to a ModelPatcher, twice: as its low-rank changes (what `apply_edit` adds) and as the
same changes expanded to dense ΔW (what a dense route adds). Printed: the bytes of the tensors the
patcher holds. The UNet is ComfyUI's own UNetModel with SDXL's config on the meta device (no weight
memory); the LoRA factors are real random tensors; the dense ΔW are meta tensors of the exact
shape and float32 dtype, so their size is exact without allocating ~9 GB. Runs in < 1 GB of RAM.

    bash run.sh bench bench_apply [--family sdxl] [--rank 4]
    bash run.sh bench bench_apply --speed [--reps 5]   # sampling time, patched / unpatched, tiny model

`--speed` samples the bundled tiny model unpatched and with each edit applied by `apply_edit` (the
LoRA form; ComfyUI merges it into the weights when it loads the model, which is done before each
timed run), in an order that rotates every repetition (so no row always runs first or last), and
prints the ratio of the median times and the median of the per-repetition ratios.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy(cpu=True)

from conceptedit.comfy_host.patches import edit_patches  # noqa: E402
from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.edit import Change, Edit  # noqa: E402
from conceptedit.editing.training import select_targets  # noqa: E402


def meta_patcher(family: str):
    """A ComfyUI ModelPatcher around the family's real UNet layout, built on the meta device."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    root = torch.nn.Module()
    root.diffusion_model = UNetModel(**arch.get_family(family).unet_config, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(root, load_device=cpu, offload_device=cpu), root.diffusion_model


def tensor_bytes(obj) -> int:
    """Bytes of every tensor a patch holds (tuples in the 2024 ComfyUI, weight_adapter objects now)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse:
            return tensor_bytes(obj._indices()) + tensor_bytes(obj._values())
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "weights"):
        return tensor_bytes(obj.weights)
    return 0


def lowrank_edit(method: str, params: dict, shapes: dict, keys: list[str], rank: int, seed: int = 0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    return Edit(method, "sdxl", {k: Change("lowrank", shapes[k], {
        "up": torch.randn(shapes[k][0], rank, generator=g) * 1e-3,
        "down": torch.randn(rank, shapes[k][1], generator=g)}) for k in keys}, params=params)


def dense_on_meta(edit: Edit) -> Edit:
    return Edit(edit.method, edit.family, {k: Change("delta", c.shape, {"delta": torch.empty(c.shape, device="meta")})
                                           for k, c in edit.changes.items()}, params=edit.params)


def measure(patcher, weights, edit: Edit) -> dict:
    edit.check_scope()
    t0 = time.perf_counter()
    patches = edit_patches(edit, weights)
    secs = time.perf_counter() - t0
    clone = patcher.clone()
    matched = clone.add_patches(patches, 1.0)
    assert len(matched) == len(edit.changes)
    held = sum(tensor_bytes(p[1]) for k in matched for p in clone.patches[k])
    values = sum(t.numel() for k in matched for p in clone.patches[k] for t in _flat(p[1]))
    kind = {type(p[1]).__name__ if not isinstance(p[1], tuple) else p[1][0] for k in matched for p in clone.patches[k]}
    return {"bytes": held, "values": values, "patch": "/".join(sorted(kind)), "seconds": round(secs, 3)}


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat(o)]
    if hasattr(obj, "weights"):
        return _flat(obj.weights)
    return []


def speed(reps: int, rank: int) -> None:
    import statistics

    from conceptedit.comfy_host.patches import model_fingerprint
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny

    model, clip, _ = load_tiny()
    weights = dict(model.model_state_dict())
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    unet = model.model.diffusion_model
    kv = sorted(k for k in shapes if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")))
    lora = [f"diffusion_model.{n}.weight" for n in select_targets(dict(unet.named_modules()), "lora")]
    prompts, seeds = ["a red circle", "a blue square"] * 4, list(range(8))
    # a clone without patches is the control row: its ratio is the noise of the measurement
    runs = {"unpatched": model, "unpatched clone (control)": model.clone()}
    for name, keys, method, params in (("UCE-like K/V", kv, "uce", {}),
                                       ("unlearning LoRA", lora, "unlearn-esd", {"param_set": "lora"})):
        edit = lowrank_edit(method, params, shapes, keys, rank)
        edit.family, edit.fingerprint = "tiny", model_fingerprint(model)
        runs[name] = apply_edit(model, None, edit)[0]
    times = {k: [] for k in runs}
    ratios = {k: [] for k in runs}
    for name, m in runs.items():  # warm-up: the first load of each clone merges its patches
        comfy_sampler(m, clip, steps=20)(prompts[:2], seeds[:2])
    import comfy.model_management as mm
    names = list(runs)
    for rep in range(reps):
        # the order rotates every repetition, so each row runs in each position equally often and a
        # drift with the position inside a repetition falls on every row alike
        order = names[rep % len(names):] + names[:rep % len(names)]
        this = {}
        for name in order:
            m = runs[name]
            mm.load_models_gpu([m])  # the patches merge here, outside the timed sampling
            t = time.perf_counter()
            comfy_sampler(m, clip, steps=20)(prompts, seeds)
            this[name] = time.perf_counter() - t
        for name, secs in this.items():
            times[name].append(secs)
            ratios[name].append(secs / this["unpatched"])
    # the UNet forward alone (batch 16, one context), same rotation: the per-step work without the
    # sampler's and text encoder's share of the time
    from conceptedit.tiny import model as tm
    from conceptedit.tiny.comfy_model import encode
    context = encode(clip, prompts[0])[0][0].repeat(16, 1, 1)
    x = torch.randn((16, tm.LATENT_CHANNELS, tm.IMAGE_SIZE, tm.IMAGE_SIZE), generator=torch.Generator().manual_seed(0))
    steps_t = torch.full((16,), 500.0)
    fwd, outs = {k: [] for k in runs}, {}
    with torch.inference_mode():
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                mm.load_models_gpu([runs[name]])
                unet_ = runs[name].model.diffusion_model
                outs[name] = unet_(x, steps_t, context=context)
                t = time.perf_counter()
                for _ in range(5):
                    unet_(x, steps_t, context=context)
                fwd[name].append((time.perf_counter() - t) / 5)
    for name in names[2:]:  # the patched rows really run the patched weights
        assert not torch.equal(outs[name], outs["unpatched"]), name
    base = statistics.median(times["unpatched"])
    print(f"tiny model, 8 samples x 20 steps, {reps} repetitions in rotating order, {torch.get_num_threads()} threads")
    print("| model | median s | median / unpatched | median of per-repetition ratios |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.3f} | "
              f"{statistics.median(ratios[name]):.3f} |")
    fbase = statistics.median(fwd["unpatched"])
    print(f"\nUNet forward alone, batch 16, 5 calls x {reps} repetitions in rotating order")
    print("| model | median ms | / unpatched |")
    print("|---|---|---|")
    for name, ts_ in fwd.items():
        print(f"| {name} | {1000 * statistics.median(ts_):.1f} | {statistics.median(ts_) / fbase:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sdxl", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--speed", action="store_true", help="sampling time patched / unpatched on the tiny model")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.speed:
        return speed(args.reps, args.rank)
    patcher, unet = meta_patcher(args.family)
    weights = {k: v for k, v in patcher.model_state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    kv = sorted(k for k in shapes if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")))
    lora = [f"diffusion_model.{n}.weight" for n in select_targets(dict(unet.named_modules()), "lora")]
    rows = {}
    for name, edit in (("UCE-like, every attn2 K/V", lowrank_edit("uce", {}, shapes, kv, args.rank)),
                       ("unlearning LoRA, param set 'lora'",
                        lowrank_edit("unlearn-esd", {"param_set": "lora"}, shapes, lora, args.rank))):
        rows[name] = {"weights": len(edit.changes), "lora": measure(patcher, weights, edit),
                      "dense": measure(patcher, weights, dense_on_meta(edit))}
    print(f"{arch.get_family(args.family).label} UNet (ComfyUI UNetModel on meta), rank {args.rank}; bytes of the "
          "tensors the ModelPatcher holds")
    print(f"| edit | weights | dense ΔW (float32) | LoRA form ({rows[next(iter(rows))]['lora']['patch']}) | ratio |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        d, lo = r["dense"], r["lora"]
        print(f"| {name} | {r['weights']} | {d['bytes'] / 2**20:,.1f} MiB ({d['values'] / 1e6:,.0f} M values) | "
              f"{lo['bytes'] / 2**20:,.2f} MiB ({lo['values'] / 1e6:,.2f} M values) | "
              f"{d['bytes'] / lo['bytes']:,.0f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
