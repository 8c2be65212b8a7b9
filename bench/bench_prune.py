"""ConceptPrune on the tiny model: erase each shape (and one style) in turn, and measure.

    bash run.sh bench bench_prune [--concepts circle,monet] [--skill-ratio 0.05] [--tau 10]
    bash run.sh bench bench_prune --sweep circle      # tune skill_ratio x tau on one concept

Per erased concept, side by side in one run (same prompts, seeds, sampler):
- efficacy: presence of the concept in samples of its own prompts, baseline -> pruned (target <= 10 %);
- specificity: accuracy on every other concept (prompts not naming the erased one), baseline ->
  pruned (target: within 3 points);
- paraphrase: presence for prompts naming the concept only by a synonym;
- pruned fraction of the ff.net.2 weights and of the whole UNet.
Speed (first concept): mask time / time of plain sampling of the same prompts, same steps, same
batches, with full trajectories (the hooks' overhead; target <= 1.10) and with the default early stop;
sampling speed of the patched vs the unpatched model; the statistics' memory.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy()

from conceptedit.comfy_host.denoiser import ComfyDenoiser  # noqa: E402
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing.arch import get_family  # noqa: E402
from conceptedit.editing.concept_prune.prune import floor_edit
from conceptedit.editing.concept_prune.config import PruneConfig
from conceptedit.editing.audit.evaluate import default_classifier, evaluate  # noqa: E402
from conceptedit.editing.prompts import TINY_DEFAULTS, build_pairs  # noqa: E402
from conceptedit.comfy_host.jobs import ConceptPruneJob, run  # noqa: E402
from conceptedit.tiny import world  # noqa: E402


def specificity_set(seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    return world.grid_prompt_set(seed)


def presence(sample, classify, concept: str, n_prompts: int, samples: int) -> float:
    """Presence of `concept` in samples of its own prompts."""
    return evaluate(sample, world.prompts_for(concept, n_prompts, 0), samples, classify).presence.get(concept, 0.0)


def measure(sample, classify, concept: str, spec, n_prompts: int, samples: int) -> dict:
    """Efficacy and paraphrase presence of `concept`; specificity from `spec` (an EvalResult on
    `specificity_set`, computed once per model) over the prompts that do not name the concept."""
    syn_prompts = world.synonym_prompts(concept, n_prompts, 0)
    syn = evaluate(sample, syn_prompts, samples, classify) if syn_prompts else None
    hits = [e[f"{k}_accuracy"] for e in spec.per_prompt if concept not in e["expected"].values()
            for k in e["expected"] if f"{k}_accuracy" in e]
    return {"efficacy": presence(sample, classify, concept, n_prompts, samples),
            "paraphrase": syn.presence.get(concept, 0.0) if syn else None,
            "specificity": sum(hits) / len(hits)}


def spec_eval(sample, classify, samples: int = 1):
    return evaluate(sample, specificity_set(), samples, classify)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def floor_presence(model, clip, edit, concepts, classify, args) -> dict[str, float]:
    """Per concept: presence in samples of its own prompts with every ``ff.net.2`` weight zeroed (the
    layers of `edit`, any ConceptPrune edit of this model), the floor that pruning FFN weights (by any
    selection) can reach on this model."""
    from conceptedit.tiny.comfy_model import comfy_sampler
    sample = comfy_sampler(apply_edit(model, None, floor_edit(edit))[0], clip, args.steps, args.cfg)
    with torch.inference_mode():
        return {c: presence(sample, classify, c, args.prompts, args.samples) for c in concepts}


def speed(model, clip, concept: str, config: PruneConfig) -> dict:
    """Mask time vs plain sampling of the same prompt sets (interleaved to share the machine's drift)."""
    pairs = build_pairs([concept], "tiny")[concept]
    sets = [[c for c, _ in pairs], [r for _, r in pairs]]
    den = ComfyDenoiser(model, clip)

    def plain():
        for s in sets:
            for b in range(0, len(s), config.batch_size):
                den.sample(s[b:b + config.batch_size], steps=config.steps, cfg=config.cfg, seed=config.seed)

    full_cfg = dataclasses.replace(config, full_trajectory=True)
    with torch.inference_mode():
        plain()  # warm-up
        _, t_plain1 = timed(plain)
        edit_full, t_full = timed(lambda: run("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=full_cfg)).edit)
        edit, t_early = timed(lambda: run("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=config)).edit)
        _, t_plain2 = timed(plain)
    same = all(torch.equal(edit.changes[k].tensors["index"], edit_full.changes[k].tensors["index"]) for k in edit.changes)
    t_plain = (t_plain1 + t_plain2) / 2
    return {"plain_s": t_plain, "prune_full_s": t_full, "prune_early_s": t_early,
            "ratio_full": t_full / t_plain, "ratio_early": t_early / t_plain, "early_equals_full": same,
            "stats_bytes_full": edit_full.metrics["stats_bytes"], "stats_bytes": edit.metrics["stats_bytes"]}


def patched_speed(model, patched, clip, steps: int, cfg: float, reps: int = 3) -> dict:
    from conceptedit.tiny.comfy_model import comfy_sampler
    prompts = [p for p, _ in specificity_set()[:8]]
    seeds = list(range(len(prompts)))
    a, b = comfy_sampler(model, clip, steps, cfg), comfy_sampler(patched, clip, steps, cfg)
    ta = tb = 0.0
    with torch.inference_mode():
        for _ in range(reps):  # alternate; after each switch one untimed call lets ComfyUI (un)merge the patches
            a(prompts[:1], seeds[:1])
            ta += timed(lambda: a(prompts, seeds))[1]
            b(prompts[:1], seeds[:1])
            tb += timed(lambda: b(prompts, seeds))[1]
    return {"unpatched_s": ta / reps, "patched_s": tb / reps, "ratio": tb / ta}


def stats_memory_table(config: PruneConfig) -> dict:
    """Bytes of the statistics for one prompt set on the real families (float32 [steps, 4d] per layer)."""
    out = {}
    for name in ("sd1", "sd2", "sdxl"):
        fam = get_family(name)
        width = sum(4 * b.dim for b in fam.blocks)
        out[name] = {"early_stop_MiB": config.tau * width * 4 / 2**20, "full_50_steps_MiB": 50 * width * 4 / 2**20}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", default=",".join(world.SHAPES) + ",monet")
    p.add_argument("--skill-ratio", type=float, default=TINY_DEFAULTS["skill_ratio"])
    p.add_argument("--tau", type=int, default=TINY_DEFAULTS["tau"])
    p.add_argument("--steps", type=int, default=20, help="steps of the calibration and evaluation sampling")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--prompts", type=int, default=6, help="prompts per concept for efficacy/paraphrase")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--sweep", default=None, help="tune: try skill_ratio x tau on this one concept")
    p.add_argument("--sweep-ratios", default="0.02,0.05,0.1,0.2")
    p.add_argument("--sweep-taus", default="5,10,20")
    p.add_argument("--speed-only", action="store_true",
                   help="only the speed rows (mask vs plain sampling, patched vs unpatched) for the first concept")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging_quiet()

    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny
    model, clip, _vae = load_tiny()
    classify = default_classifier()
    base_sample = comfy_sampler(model, clip, args.steps, args.cfg)
    with torch.inference_mode():
        base_spec = spec_eval(base_sample, classify)
    results: dict = {"args": vars(args), "rows": []}

    if args.sweep:
        c = args.sweep
        with torch.inference_mode():
            base = measure(base_sample, classify, c, base_spec, args.prompts, args.samples)
        print(f"baseline {c}: {base}")
        print("| skill_ratio | τ | efficacy | paraphrase | specificity | pruned % ff.net.2 |\n|---|---|---|---|---|---|")
        edit = None
        for ratio in [float(x) for x in args.sweep_ratios.split(",")]:
            for tau in [int(x) for x in args.sweep_taus.split(",")]:
                if tau > args.steps:
                    continue
                cfg = PruneConfig(skill_ratio=ratio, tau=tau, steps=args.steps, cfg=args.cfg)
                with torch.inference_mode():
                    edit = run("concept_prune", model, clip, ConceptPruneJob(concepts=[c], preset="tiny", settings=cfg)).edit
                    patched = apply_edit(model, None, edit)[0]
                    after_sample = comfy_sampler(patched, clip, args.steps, args.cfg)
                    r = measure(after_sample, classify, c, spec_eval(after_sample, classify), args.prompts, args.samples)
                row = {"skill_ratio": ratio, "tau": tau, **r, "pruned_ffn": edit.metrics["pruned_fraction_ffn"]}
                results["rows"].append(row)
                print(f"| {ratio} | {tau} | {r['efficacy']:.0%} | {_pct(r['paraphrase'])} | {r['specificity']:.1%} "
                      f"| {100 * row['pruned_ffn']:.2f} |", flush=True)
        if edit is not None:  # the last edit names the FFN layers; no extra calibration run for the floor
            results["ffn_floor"] = floor_presence(model, clip, edit, [c], classify, args)
            print(f"every ff.net.2 weight zeroed: {c} {results['ffn_floor'][c]:.0%} (the floor for any FFN pruning)")
        _dump(args, results)
        return results

    config = PruneConfig(skill_ratio=args.skill_ratio, tau=args.tau, steps=args.steps, cfg=args.cfg)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    if args.speed_only:
        with torch.inference_mode():
            last = run("concept_prune", model, clip, ConceptPruneJob(concepts=concepts[:1], preset="tiny", settings=config)).model
        return _speed_rows(model, clip, last, concepts, config, args, results)
    print(f"ConceptPrune on the tiny model: skill_ratio {config.skill_ratio}, τ {config.tau}, {config.steps} steps, "
          f"CFG {config.cfg}; {args.prompts} prompts x {args.samples} samples per concept\n")
    print("| erased | efficacy base → pruned | every FFN zeroed | paraphrase base → pruned | "
          "specificity base → pruned | pruned % ff.net.2 | pruned % UNet | mask s |\n"
          "|---|---|---|---|---|---|---|---|")
    last_patched = None
    floor = None
    for c in concepts:
        with torch.inference_mode():
            base = measure(base_sample, classify, c, base_spec, args.prompts, args.samples)
            edit, t = timed(lambda: run("concept_prune", model, clip, ConceptPruneJob(concepts=[c], preset="tiny", settings=config)).edit)
        if floor is None:  # one model with every FFN weight zeroed serves all concepts
            floor = results["ffn_floor"] = floor_presence(model, clip, edit, concepts, classify, args)
        with torch.inference_mode():
            patched = apply_edit(model, None, edit)[0]
            after_sample = comfy_sampler(patched, clip, args.steps, args.cfg)
            after = measure(after_sample, classify, c, spec_eval(after_sample, classify), args.prompts, args.samples)
        last_patched = patched
        m = edit.metrics
        row = {"concept": c, "baseline": base, "pruned": after, "ffn_floor": floor[c],
               "pruned_ffn": m["pruned_fraction_ffn"], "pruned_unet": m["pruned_fraction_unet"], "mask_s": t}
        results["rows"].append(row)
        print(f"| {c} | {base['efficacy']:.0%} → {after['efficacy']:.0%} | {floor[c]:.0%} | "
              f"{_pct(base['paraphrase'])} → {_pct(after['paraphrase'])} | "
              f"{base['specificity']:.1%} → {after['specificity']:.1%} | "
              f"{100 * m['pruned_fraction_ffn']:.2f} | {100 * m['pruned_fraction_unet']:.3f} | {t:.0f} |", flush=True)

    return _speed_rows(model, clip, last_patched, concepts, config, args, results)


def _speed_rows(model, clip, last_patched, concepts, config, args, results):
    s = speed(model, clip, concepts[0], config)
    ps = patched_speed(model, last_patched, clip, args.steps, args.cfg)
    results.update(speed=s, patched_speed=ps, stats_memory=stats_memory_table(config))
    print(f"\nSpeed ({concepts[0]}, {2 * len(build_pairs([concepts[0]], 'tiny')[concepts[0]])} generations, "
          f"{config.steps} steps, same batches):")
    print(f"- plain sampling {s['plain_s']:.1f}s; mask with full trajectories {s['prune_full_s']:.1f}s "
          f"(ratio {s['ratio_full']:.2f}); with the early stop after τ {s['prune_early_s']:.1f}s "
          f"(ratio {s['ratio_early']:.2f}); same mask: {s['early_equals_full']}")
    print(f"- statistics: {s['stats_bytes'] / 1024:.0f} KiB (full trajectories {s['stats_bytes_full'] / 1024:.0f} KiB) "
          "on the tiny model; per prompt set on real models: " + ", ".join(
              f"{k} {v['early_stop_MiB']:.1f} MiB (50 steps: {v['full_50_steps_MiB']:.1f})"
              for k, v in results["stats_memory"].items()))
    print(f"- sampling, patched vs unpatched: {ps['patched_s']:.2f}s vs {ps['unpatched_s']:.2f}s "
          f"(ratio {ps['ratio']:.2f})")
    _dump(args, results)
    return results


def _pct(x):
    return "–" if x is None else f"{x:.0%}"


def _dump(args, results):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


def logging_quiet():
    import logging
    logging.basicConfig(level=logging.WARNING)


if __name__ == "__main__":
    main()
