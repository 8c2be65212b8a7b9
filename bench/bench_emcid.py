"""EMCID benchmark.

  bash run.sh bench bench_emcid --part tiny   efficacy / specificity / paraphrase on the tiny model
                                              (1 concept, and all-but-one shape), original vs edited;
                                              --residual official,memit compares stage 2's two residuals
  bash run.sh bench bench_emcid --part scale  stage-2 time and memory for 1/10/100(/1000) concepts on a
                                              CLIP-L of SD1.5's real sizes (random weights, real
                                              tokenizer), and batched vs one-concept-at-a-time
  bash run.sh bench bench_emcid --part stage1 stage-1 time on the tiny model for 1/8(/64) concepts
                                              (--stage1-sizes), concepts batched (stage1_batch 0,
                                              automatic) vs one at a time, in one run; denoiser
                                              forwards per concept
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402
from conceptedit.tiny.world import EMCID_TEMPLATES  # noqa: E402

log = logging.getLogger("bench_emcid")

TINY_TEMPLATES = EMCID_TEMPLATES["shape"]


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clip_l_random(seed: int = 0):
    """A ComfyUI SD1.x CLIP (CLIP-L from sd1_clip_config.json, real tokenizer) with random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from conceptedit.tiny.model import init_weights
    torch.manual_seed(seed)
    with torch.no_grad():  # CLIPTextModel copies into a parameter in its constructor
        clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                           comfy.sd1_clip.SD1ClipModel))
        init_weights(clip.cond_stage_model.clip_l.transformer)
    clip.cond_stage_model.to(torch.float32)
    return clip


def concept_names(n: int) -> list[str]:
    from conceptedit.editing.emcid.captions import ATTRIBUTES, SUBJECTS
    return [f"{a} {s}" for s in SUBJECTS for a in ATTRIBUTES][:n]


def part_scale(sizes, n_captions: int, one_at_a_time: int) -> dict:
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    from conceptedit.editing.arch import get_family
    from conceptedit.editing.emcid.stage2 import concept_prompts, read_keys, resolve_defaults, second_moments, stage2
    from conceptedit.editing.emcid.config import EmcidConfig
    spec = get_family("sd1").text_encoders[0]
    layers = spec.edit_layers
    clip = clip_l_random()
    text = ComfyTextModel(clip)
    dev = torch.device(text.device)
    cfg, _ = resolve_defaults(EmcidConfig(use_stage1=False, n_captions=n_captions, templates=("a photo of {}",)),
                              "sd1", ("clip_l",))
    lam = cfg.lam_for("clip_l", spec.mlp)  # the default is relative: per dimension of the 3072-wide keys
    t = time.perf_counter()
    C0 = second_moments(text, "clip_l", layers, cfg)
    out = {"device": str(dev), "layers": list(layers), "c0_seconds": round(time.perf_counter() - t, 2),
           "c0_captions": n_captions, "rows": []}
    for n in sizes:
        names = concept_names(n + 1)
        prompts = concept_prompts(text, names[:n], cfg.templates)
        dst = concept_prompts(text, names[1:n + 1], cfg.templates)
        _, Z = read_keys(text, "clip_l", dst, None, layers[-1], batch=cfg.batch)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        base = _peak_mb(dev)
        t = time.perf_counter()
        ups, m = stage2(text, "clip_l", layers, prompts, Z, C0, lam, cfg.batch, residual=cfg.residual)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        row = {"concepts": n, "stage2_s": round(time.perf_counter() - t, 3), "peak_mb": round(_peak_mb(dev), 1),
               "peak_growth_mb": round(_peak_mb(dev) - base, 1), "gap_after": round(m["gap_after"], 4)}
        # closed-form part alone (the 11 float64 solves), to separate it from the encoder passes
        K = torch.randn(n, spec.mlp, dtype=torch.float64, device=dev)
        t = time.perf_counter()
        from conceptedit.editing.emcid.stage2 import solve_update
        for i in layers:
            solve_update(K, torch.randn(n, spec.width, dtype=torch.float64, device=dev), C0[i], lam)
        row["solves_s"] = round(time.perf_counter() - t, 3)
        if n == one_at_a_time:
            t = time.perf_counter()
            for j in range(n):
                p1 = concept_prompts(text, names[j:j + 1], cfg.templates)
                stage2(text, "clip_l", layers, p1, Z[j:j + 1], C0, lam, cfg.batch, residual=cfg.residual)
            row["one_at_a_time_s"] = round(time.perf_counter() - t, 3)
            row["speedup_batched_vs_one_at_a_time"] = round(row["one_at_a_time_s"] / row["stage2_s"], 2)
        log.info("%s", row)
        out["rows"].append(row)
    return out


COLOUR_TEMPLATES = EMCID_TEMPLATES["colour"]


def part_tiny(lams, use_stage1: bool, steps: int, n_prompts: int, samples: int, kind: str = "colour",
              residuals=("official",), case_names=("one", "all_but_one")) -> dict:
    """`lams`: (λ, lam_mode) pairs; λ 0 is the family default in that mode."""
    from conceptedit.comfy_host.jobs import EmcidJob, run
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.audit.evaluate import erasure_report
    from conceptedit.tiny import world
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny
    model, clip, _ = load_tiny()
    # shapes: erase to the generic word "shape"; colours: redirect to the kind's last colour
    shapes = list(world.SHAPES) if kind == "shape" else list(world.COLOURS)
    dest = (lambda c: "shape") if kind == "shape" else (lambda c: shapes[-1])
    templates = TINY_TEMPLATES if kind == "shape" else COLOUR_TEMPLATES
    cases = {"one": ([shapes[0]], [s for s in shapes[1:-1]] if kind != "shape" else shapes[1:]),
             "all_but_one": (shapes[:-1], shapes[-1:])}
    cases = {k: v for k, v in cases.items() if k in case_names}
    out = {"stage1": use_stage1, "kind": kind, "templates": templates, "residuals": list(residuals), "cases": {}}
    erased_all = sorted({c for e, _ in cases.values() for c in e})
    base = erasure_report(comfy_sampler(model, clip), erased_all, shapes, n_prompts=n_prompts,
                          samples_per_prompt=samples)
    out["original"] = base
    cache = os.path.join(ROOT, ".cache", "emcid")
    for name, (erased, kept) in cases.items():
        for residual, (lam, lam_mode) in [(r, lam) for r in residuals for lam in lams]:
            cfg = EmcidConfig(lam=lam or None, lam_mode=lam_mode, use_stage1=use_stage1, steps=steps, templates=templates,
                              n_captions=1000, residual=residual)
            t = time.perf_counter()
            _, clip2, edit, _ = run("emcid", model, clip, EmcidJob(pairs=[(c, dest(c)) for c in erased], settings=cfg, cache_dir=cache))
            secs = time.perf_counter() - t
            r = erasure_report(comfy_sampler(model, clip2), erased, kept, n_prompts=n_prompts, samples_per_prompt=samples)
            st2 = edit.metrics["stage2"]["clip_l"]
            row = {"residual": residual, "lam": lam, "lam_mode": lam_mode, "lam_absolute": st2.get("lam"),
                   "reach_per_layer": st2.get("reach_per_layer"), "seconds": round(secs, 1),
                   "efficacy_presence": _mean(r["efficacy"]), "efficacy_before": _mean({c: base["efficacy"][c] for c in erased}),
                   "paraphrase_presence": _mean(r["paraphrase"]),
                   "paraphrase_before": _mean({c: base["paraphrase"][c] for c in erased if c in base["paraphrase"]}),
                   "specificity": _mean(r["specificity"]), "specificity_before": _mean({c: base["specificity"][c] for c in kept}),
                   "gap_after": edit.metrics["stage2"]["clip_l"]["gap_after"]}
            log.info("%s %s", name, row)
            out["cases"].setdefault(name, []).append(row)
    return out


def part_stage1(sizes, steps: int) -> dict:
    """Stage 1 alone (`optimise_targets`, no cache) on the shipped tiny model, each size one at a time
    (stage1_batch=1) and batched (0: automatic), with the same concepts and settings."""
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    from conceptedit.editing.arch import get_family
    from conceptedit.editing.emcid.stage1 import optimise_targets, stage1_batch_size
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.training import frozen_session
    from conceptedit.tiny import world
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _ = load_tiny()
    text, den = ComfyTextModel(clip), ComfyDenoiser(model, clip)
    last = {"clip_l": get_family("tiny").text_encoders[0].edit_layers[-1]}
    names = [f"{c} {s}" for s in world.SHAPES for c in world.COLOURS]
    calls = {"eps": 0, "eps_rows": 0, "sample": 0, "sample_s": 0.0}
    eps, sample = den.eps, den.sample

    def counted_eps(x, *a, **kw):
        calls["eps"] += 1
        calls["eps_rows"] += x.shape[0]
        return eps(x, *a, **kw)

    def counted_sample(prompts, **kw):  # drawing the pictures is timed apart from the optimisation
        calls["sample"] += 1
        t = time.perf_counter()
        try:
            return sample(prompts, **kw)
        finally:
            calls["sample_s"] += time.perf_counter() - t

    den.eps, den.sample = counted_eps, counted_sample
    dev = next(den.unet().parameters()).device
    out = {"device": str(dev), "threads": torch.get_num_threads(), "steps": steps, "templates": len(TINY_TEMPLATES),
           "rows": []}
    for n in sizes:
        pairs = [(names[i % len(names)] + ("" if i < len(names) else f" {i}"), world.SHAPES[i % len(world.SHAPES)])
                 for i in range(n)]
        row = {"concepts": n}
        zs = {}
        for mode, size in (("one_at_a_time", 1), ("batched", 0)):
            cfg = EmcidConfig(steps=steps, templates=TINY_TEMPLATES, stage1_batch=size)
            for k in calls:
                calls[k] = 0
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            with torch.enable_grad(), frozen_session(model.model.diffusion_model):
                zs[mode], m = optimise_targets(text, den, pairs, last, cfg)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            row[f"{mode}_s"] = round(time.perf_counter() - t, 2)
            row[f"{mode}_sampling_s"] = round(calls["sample_s"], 2)
            row[f"{mode}_optimise_s"] = round(row[f"{mode}_s"] - calls["sample_s"], 2)
            row[f"{mode}_batch"] = m["stage1_batch"]
            row[f"{mode}_eps_forwards_per_concept"] = round(calls["eps"] / n, 2)
            row[f"{mode}_eps_rows_per_forward"] = round(calls["eps_rows"] / max(calls["eps"], 1), 1)
            row[f"{mode}_sampling_calls_per_concept"] = calls["sample"] / n
        row["speedup_batched_vs_one_at_a_time"] = round(row["one_at_a_time_s"] / row["batched_s"], 2)
        row["speedup_optimisation_alone"] = round(row["one_at_a_time_optimise_s"] / row["batched_optimise_s"], 2)
        z1, zb = zs["one_at_a_time"]["clip_l"], zs["batched"]["clip_l"]
        row["max_rel_diff_z"] = float(((zb - z1).norm(dim=1) / z1.norm(dim=1)).max())
        log.info("%s", row)
        out["rows"].append(row)
    out["auto_batch_for_64"] = stage1_batch_size(EmcidConfig(templates=TINY_TEMPLATES), den, 64)
    den.eps, den.sample = eps, sample
    return out


def _mean(d) -> float:
    return round(sum(d.values()) / len(d), 3) if d else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["tiny", "scale", "stage1", "all"], default="all")
    ap.add_argument("--stage1-sizes", default="1,8", help="concept counts for --part stage1 (64 too on a GPU)")
    ap.add_argument("--sizes", default="1,10,100", help="concept counts for --part scale (add 1000 on a GPU)")
    ap.add_argument("--one-at-a-time", type=int, default=10, help="size at which to also time N single-concept runs")
    ap.add_argument("--captions", type=int, default=2000, help="captions for C0 in --part scale")
    ap.add_argument("--lam", default="100,1000,6000", help="λ values for --part tiny, each VALUE or VALUE:MODE (mode "
                    "absolute, the default here, or relative; 0 = the family default in that mode)")
    ap.add_argument("--cases", default="one,all_but_one", help="--part tiny: one (the kind's first concept), "
                    "all_but_one, comma-separated")
    ap.add_argument("--stage1", action="store_true", help="--part tiny: run stage 1 (else destination targets)")
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps (--part tiny: 100, --part stage1: 20)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--kind", choices=["colour", "shape"], default="colour", help="--part tiny: which concepts to edit")
    ap.add_argument("--residual", default="official",
                    help="--part tiny: stage-2 residual(s), comma-separated: official (EMCID's code), memit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_comfy()
    res = {}
    if args.part in ("scale", "all"):
        res["scale"] = part_scale([int(s) for s in args.sizes.split(",")], args.captions, args.one_at_a_time)
    if args.part in ("stage1", "all"):
        res["stage1"] = part_stage1([int(s) for s in args.stage1_sizes.split(",")], args.steps or 20)
    if args.part in ("tiny", "all"):
        lams = [(float(x.split(":")[0]), (x.split(":") + ["absolute"])[1]) for x in args.lam.split(",")]
        res["tiny"] = part_tiny(lams, args.stage1, args.steps or 100, args.prompts, args.samples, args.kind,
                                tuple(r.strip() for r in args.residual.split(",") if r.strip()),
                                tuple(c.strip() for c in args.cases.split(",") if c.strip()))
    print(json.dumps(res, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
