"""`conceptedit evaluate --ckpt tiny --edit erase_red.safetensors --prompts prompts.csv --judge classifier,presence`:
the erasure benchmark of an edit on its model (original vs edited, judged alike), resumable through
an on-disk cache; writes a markdown report and a CSV table beside it."""
from __future__ import annotations

import logging
import os
import shlex
import sys
import time

log = logging.getLogger(__name__)


def register(sub) -> None:
    from .common import add_model_arg
    p = sub.add_parser("evaluate", help="erasure benchmark: original vs edited model on a prompt set (CSV, text, folder)")
    add_model_arg(p)
    p.add_argument("--edit", required=True, help="the edit file (.safetensors from any ConceptEdit method)")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompts", required=True, action="append",
                   help="a prompt CSV (prompt, evaluation_seed, evaluation_guidance[, case_number, categories, class]), "
                        "a text file (one prompt a line) or a folder of them; repeatable (each file is a set)")
    p.add_argument("--judge", default="presence", help="comma-separated: classifier (the tiny world's), presence")
    p.add_argument("--concept", default=None, help="the erased concepts, comma-separated (default: the edit's own); "
                   "a class named here counts as erased, every other class as kept")
    p.add_argument("--samples", type=int, default=1, help="pictures per prompt (seeds evaluation_seed + 0, 1, ...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance where a prompt names no evaluation_guidance")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0, help="base seed for prompts without one (text files)")
    p.add_argument("--batch", type=int, default=8, help="pictures per sampler call")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of each file")
    p.add_argument("--presence-timesteps", type=int, default=4)
    p.add_argument("--presence-draws", type=int, default=1)
    p.add_argument("--cache", default="out/benchmark/cache", help="the result cache folder ('' for none): a stopped "
                   "run resumes from it, and edits of one model share the original's results")
    p.add_argument("--out", default="out/benchmark/report.md", help="the markdown report; the CSV goes beside it")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..comfy_host.adapters import apply_edit
    from ..comfy_host.benchmark import benchmark_models
    from ..editing.audit.presence import concept_words
    from ..editing.benchmark.cache import ResultCache, edit_fingerprint
    from ..editing.benchmark.judges import parse_judges
    from ..editing.benchmark.prompts import read_prompts
    from ..editing.benchmark.runner import Settings
    from ..editing.edit import Edit
    from .common import load_model, terminal_context

    judges = parse_judges(args.judge)
    cases = [c for path in args.prompts for c in read_prompts(path, base_seed=args.seed, limit=args.limit)]
    settings = Settings(samples=args.samples, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                        scheduler=args.scheduler, batch=args.batch).validate()
    model, clip = load_model(args.ckpt, cpu=args.cpu)
    edit = Edit.load(args.edit)
    edited, edited_clip, warnings = apply_edit(model, clip, edit, args.strength)
    for w in warnings:
        log.warning(w)
    erased = concept_words(args.concept, edit.concepts)
    cache = ResultCache(args.cache or None)
    edit_key = edit_fingerprint(edit, args.strength)  # hashes every tensor of the edit: once
    info = {"base_seed": args.seed, "edit": f"{os.path.basename(args.edit)} ({edit.method}, strength {args.strength}, "
                                           f"{edit_key})",
            "command": "conceptedit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""}
    t0 = time.time()
    with torch.inference_mode():
        report = benchmark_models(model, clip, edited, edited_clip, cases, settings, judges,
                                  edit_key=edit_key, erased=erased, cache=cache,
                                  ctx=terminal_context(), negative=args.negative, info=info,
                                  judge_options={"presence": {"timesteps": args.presence_timesteps,
                                                              "noise_draws": args.presence_draws,
                                                              "concepts": erased}})
    seconds = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    md = report.to_markdown()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(md)
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        f.write(report.to_csv())
    print(md)
    n = report.settings["pictures"] * 2
    print(f"{n} pictures judged in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} per second; "
          f"{report.stats['generated']} generated, {report.stats['pictures_cached']} read from the cache)")
    print(f"report: {args.out}\ntable:  {csv_path}")
    return 0
