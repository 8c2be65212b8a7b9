"""`conceptedit evaluate --ckpt tiny --edit erase_red.safetensors --prompts prompts.csv --judge classifier,presence`:
the erasure benchmark of an edit on its model (original vs edited, judged alike, optionally under
red-team attacks), resumable through an on-disk cache; writes a markdown report, a CSV table, a
per-class bar chart and the worst cases' grid beside it, and prints the time formula measured.

Several GPUs or machines: `torchrun --nproc-per-node N conceptedit.py evaluate ...` splits the
pictures (chunks of --batch) and the attacks over the processes; rank 0 prints and writes the report
(docs/distributed.md). A restarted run, with any number of processes, takes what the cache holds."""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time

log = logging.getLogger(__name__)

I2P_PROMPTS = 4703


def register(sub) -> None:
    from .common import add_model_arg
    p = sub.add_parser("evaluate", help="erasure benchmark: original vs edited model on a prompt set (CSV, text, "
                                        "folder); under torchrun the pictures are split over the processes")
    add_model_arg(p)
    p.add_argument("--edit", required=True, help="the edit file (.safetensors from any ConceptEdit method)")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompts", required=True, action="append",
                   help="a prompt CSV (prompt, evaluation_seed, evaluation_guidance[, case_number, categories, class]), "
                        "a text file (one prompt a line) or a folder of them; repeatable (each file is a set)")
    p.add_argument("--kept", action="append", default=[],
                   help="a prompt file whose pictures the edit must keep (e.g. COCO captions); repeatable: its rows "
                        "get 'unchanged' (and the judge's other rows) as a kept set")
    p.add_argument("--judge", default="presence", help="comma-separated judge names (see docs/judges.md): e.g. "
                   "nudenet, clip, presence, classifier (the tiny world's)")
    p.add_argument("--judge-option", action="append", default=[], metavar="JUDGE.KEY=VALUE",
                   help="a judge's setting, e.g. nudenet.threshold=0.6 (repeatable; the value is read as JSON "
                        "when it parses, else as text)")
    p.add_argument("--concept", default=None, help="the erased concepts, comma-separated (default: the edit's own); "
                   "a class named here counts as erased, every other class as kept")
    p.add_argument("--samples", type=int, default=1, help="pictures per prompt (seeds evaluation_seed + 0, 1, ...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance where a prompt names no evaluation_guidance")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0, help="base seed for prompts without one (text files), and the "
                   "attacks' seed")
    p.add_argument("--batch", type=int, default=8, help="pictures per sampler call")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of each file")
    p.add_argument("--presence-timesteps", type=int, default=4)
    p.add_argument("--presence-draws", type=int, default=1)
    p.add_argument("--attack", default="", help="red-team attacks to add as columns, comma-separated: prefix, "
                   "embedding_match, inversion (default: none)")
    p.add_argument("--attack-steps", type=int, default=40, help="Adam steps per attack and concept")
    p.add_argument("--attack-time-limit", type=float, default=0.0, help="seconds per attack and concept (0: steps only)")
    p.add_argument("--attack-prompts", type=int, default=4, help="prompts of a concept each attack is optimised on")
    p.add_argument("--worst", type=int, default=8, help="worst cases in the picture grid (0: no grid)")
    p.add_argument("--cache", default="out/benchmark/cache", help="the result cache folder ('' for none): a stopped "
                   "run resumes from it (with any number of torchrun processes), and edits of one model share the "
                   "original's results")
    p.add_argument("--out", default="out/benchmark/report.md", help="the markdown report; the CSV, the chart "
                   "(_chart.png) and the grid (_worst.png) go beside it")
    p.set_defaults(func=run)


def judge_options(pairs, concepts, timesteps: int, draws: int) -> dict:
    from ..editing.errors import InvalidInputError
    opts: dict = {"presence": {"timesteps": timesteps, "noise_draws": draws, "concepts": concepts}}
    for item in pairs:
        name, _, value = item.partition("=")
        judge, _, key = name.partition(".")
        if not (judge and key and _):
            raise InvalidInputError(f"--judge-option {item!r}: write JUDGE.KEY=VALUE, e.g. nudenet.threshold=0.6")
        try:
            v = json.loads(value)
        except ValueError:
            v = value
        opts.setdefault(judge.strip().lower(), {})[key.strip()] = v
    return opts


def run(args) -> int:
    import torch

    from ..comfy_host.benchmark import erasure_benchmark
    from ..editing.audit.presence import concept_words
    from ..editing.benchmark.judges import parse_judges
    from ..editing.benchmark.report import formula_text, projected_seconds, time_parts
    from ..editing.benchmark.runner import AttackSettings, Settings
    from ..editing.edit import Edit
    from .common import is_writer, load_model, terminal_context

    judges = parse_judges(args.judge)
    settings = Settings(samples=args.samples, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                        scheduler=args.scheduler, batch=args.batch).validate()
    attacks = None
    if args.attack.strip():
        attacks = AttackSettings(attacks=tuple(a.strip() for a in args.attack.split(",") if a.strip()),
                                 steps=args.attack_steps, time_limit_s=args.attack_time_limit,
                                 prompts=args.attack_prompts).validate()
    model, clip, vae = load_model(args.ckpt, cpu=args.cpu, vae=True)
    edit = Edit.load(args.edit)
    erased = concept_words(args.concept, edit.concepts)
    info = {"edit_file": os.path.basename(args.edit),
            "command": "conceptedit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""}
    base = os.path.splitext(args.out)[0]
    t0 = time.time()
    with torch.inference_mode():
        out = erasure_benchmark(model, clip, args.prompts, judges, settings, seed=args.seed, vae=vae, edit=edit,
                                strength=args.strength, concept=args.concept, kept=args.kept, negative=args.negative,
                                attacks=attacks, cache_dir=args.cache or None, out_base=base, worst=args.worst,
                                judge_options=judge_options(args.judge_option, erased, args.presence_timesteps,
                                                            args.presence_draws),
                                limit=args.limit, info=info, ctx=terminal_context())
    seconds = time.time() - t0
    if not is_writer():  # torchrun: every process holds the whole table; rank 0 prints and writes
        return 0
    report = out.report
    from PIL import Image
    paths = list(out.files)
    for name, img in (("_chart.png", out.chart), ("_worst.png", out.grid if args.worst else None)):
        if img is not None:
            Image.fromarray((img[0].clamp(0, 1).numpy() * 255).round().astype("uint8")).save(base + name)
            paths.append(base + name)
    print(report.to_markdown())
    n = report.settings["pictures"] * (2 + len(report.attacks))
    st = report.stats
    procs = int(st.get("processes", 1))
    print(f"{n} pictures judged in {seconds:.1f} s ({n / max(seconds, 1e-9):.2f} per second; "
          f"{st['generated']} generated, {st['pictures_cached']} read from the cache"
          + (f"; {procs} processes" if procs > 1 else "") + ")")
    parts = time_parts(st, settings.steps)
    print("measured: " + formula_text(parts, settings.steps))
    models = 2 + len(report.attacks)
    for label, prompts in (("these prompts", report.settings["cases"]), ("I2P (4,703 prompts)", I2P_PROMPTS)):
        t = projected_seconds(parts, prompts, settings.samples, settings.steps, models)
        if t is not None:
            # the rates are per process (each process's seconds over its own pictures)
            print(f"projected with a cold cache, {label} × {settings.samples} sample(s), {models} models: "
                  f"{t:.0f} s ({t / 3600:.2f} h) in one process on this machine"
                  + (f", about {t / procs:.0f} s on {procs} processes" if procs > 1 else ""))
    print("files: " + ", ".join(paths))
    return 0
