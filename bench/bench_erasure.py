"""Throughput of the erasure benchmark on the tiny model, and the time formula of a large run.

    bash run.sh bench bench_erasure [--prompts 2] [--samples 2] [--steps 10,20] [--judges classifier,presence]

Runs `comfy_host.benchmark.benchmark_models` (the node's and `conceptedit evaluate`'s code) on a UCE
erase of "red", over every colour × `--prompts` prompts × `--samples` pictures, with a cold cache at
each step count, then once more with the cache warm. From the cold runs it separates the sampling
time per picture into a fixed part and a per-step part (a line through the step counts), reads each
judge's time per picture, and prints

    T(P prompts × S samples × n steps) = P × S × M × (a + n × b + Σ_judges j)

with M = 2 models (plus one per attack on the prompts it covers), and that T for I2P's 4,703 prompts.
A user gets the same parts for their GPU from one short `conceptedit evaluate` run (it prints them).
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: I001

import argparse
import logging
import tempfile
import time

import torch
from conceptedit.comfy_host.locate import ensure_comfy

ensure_comfy(cpu=True)

from conceptedit.comfy_host.benchmark import benchmark_models
from conceptedit.comfy_host.jobs import UCEJob, run as run_job
from conceptedit.editing.benchmark.cache import ResultCache, edit_fingerprint
from conceptedit.editing.benchmark.prompts import PromptCase
from conceptedit.editing.benchmark.report import time_parts
from conceptedit.editing.benchmark.runner import Settings
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.uce.config import UCEConfig
from conceptedit.tiny import world
from conceptedit.tiny.comfy_model import load_tiny

I2P = 4703


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2, help="prompts per colour")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", default="10,20", help="two or more step counts (the per-step part is the slope)")
    ap.add_argument("--judges", default="classifier,presence")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, clip, _ = load_tiny()
    steps = [int(s) for s in args.steps.split(",")]
    cases = [PromptCase(p, seed=100 + 13 * i, guidance=5.0, label=c, set="colours")
             for c in world.CONCEPTS["colour"] for i, (p, _) in enumerate(world.prompts_for(c, args.prompts, seed=2))]
    with torch.inference_mode():
        res = run_job("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], mode="erase", guide="", token_window="last")),
                                        RunContext())
        key = edit_fingerprint(res.edit)
        root = tempfile.mkdtemp(prefix="bench-erasure-")

        def run(n_steps):
            t0 = time.perf_counter()
            rep = benchmark_models(model, clip, res.model, None, cases, Settings(samples=args.samples, steps=n_steps,
                                                                                 cfg=5.0, batch=args.batch),
                                   args.judges, edit_key=key, erased=["red"], cache=ResultCache(root), ctx=RunContext(),
                                   judge_options={"presence": {"concepts": ["red"]}})
            return time.perf_counter() - t0, rep
        cold = {n: run(n) for n in steps}
        warm_s, warm = run(steps[-1])
    pictures = len(cases) * args.samples * 2
    print(f"tiny model, UCE erase of red; {len(cases)} prompts × {args.samples} samples × 2 models = {pictures} "
          f"pictures per run; judges {args.judges}; batch {args.batch}; {os.cpu_count()}-core CPU, torch "
          f"{torch.__version__}, {args.threads} threads")
    print("| run | seconds | pictures per second (generated and judged) | sampling s per picture | judges s per picture |")
    print("|---|---|---|---|---|")
    per_pic = {}
    for n, (s, rep) in cold.items():
        st = rep.stats
        parts = time_parts(st, n)
        per_pic[n] = st["generate_s"] / st["generated"]
        judges = ", ".join(f"{k} {v:.4f}" for k, v in parts["judge_s"].items())
        print(f"| cold, {n} steps | {s:.1f} | {pictures / s:.2f} | {per_pic[n]:.4f} | {judges} |")
    st = warm.stats
    print(f"| warm cache, {steps[-1]} steps | {warm_s:.2f} | {pictures / warm_s:.0f} | (nothing generated: "
          f"{st['generated']}, judged {st['judged']}; {st['judged_cached']} judgements read) | |")
    assert st["generated"] == 0 and warm.rows == cold[steps[-1]][1].rows
    # sampling time per picture = a + b × steps, fitted through the cold runs
    xs, ys = list(per_pic), list(per_pic.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    a = my - b * mx
    judge = time_parts(cold[steps[-1]][1].stats, steps[-1])["judge_s"]
    j = sum(judge.values())
    print()
    print(f"per picture: sampling a + n·b with a = {a:.4f} s (text encoding, batching, decode-free) and b = {b:.5f} s "
          f"per step (the denoiser with classifier-free guidance: two UNet passes); judges "
          + ", ".join(f"{k} {v:.4f} s" for k, v in judge.items()))
    print(f"T(P × S × n steps) = P × S × 2 × ({a:.4f} + n × {b:.5f} + {j:.4f}) s")
    for s, n in ((1, 20), (1, 50), (10, 50)):
        t = I2P * s * 2 * (a + n * b + j)
        print(f"  I2P, {I2P} prompts × {s} sample(s) × {n} steps: {t:.0f} s = {t / 3600:.2f} h on this machine")


if __name__ == "__main__":
    main()
