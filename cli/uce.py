"""`conceptedit uce --ckpt tiny --concepts FILE.txt|.csv --mode erase --guide "" --out e.safetensors`:
the closed-form cross-attention edit headless, written as an edit file (apply it with the
Load/Apply Concept Edit nodes, or export it with `conceptedit export-lora`)."""
from __future__ import annotations

import csv
import logging
import os

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..editing.uce.config import EMPTY_GUIDES, EXPANSIONS, MODES, OFFICIAL, OFFICIAL_SOURCES, TOKEN_WINDOWS
    from .common import add_model_arg
    p = sub.add_parser("uce", help="closed-form cross-attention edit (UCE): erase/redirect/debias/moderate concepts")
    add_model_arg(p)
    p.add_argument("--concepts", required=True,
                   help="a .txt file (one concept per line, 'source -> target' allowed) or a .csv whose first "
                        "column is the concept and optional second column its target")
    p.add_argument("--mode", choices=MODES, default="erase")
    p.add_argument("--guide", default="", help="erase/redirect target ('' = unconditional); debias: 'a:0.5, b:0.5'")
    p.add_argument("--preserve", default="", help="a .txt file of concepts to keep unchanged (added to the defaults; "
                   "under --official a line \"\" is the empty prompt)")
    p.add_argument("--no-default-preserve", action="store_true", help="do not add the ~30 generic preserve prompts")
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--lam-mode", choices=("absolute", "relative"), default="absolute",
                   help="absolute: the paper's λ; relative: λ per unit of the text rows' mean square (scale-free)")
    p.add_argument("--erase-scale", type=float, default=1.0)
    p.add_argument("--preserve-scale", type=float, default=None,
                   help="s_p; left out: the procedure's own default (off 0.1, uce_sd_erase 1, train_erase "
                        "max(0.1, 1 / (1 + preserve prompts)))")
    p.add_argument("--token-window", choices=TOKEN_WINDOWS, default="auto")
    p.add_argument("--expand", choices=tuple(EXPANSIONS), default="none",
                   help="also edit each concept in the official templates (artist: 'painting by X', ...; the empty "
                        "guide becomes 'art'; object: 'photo of X', ...)")
    p.add_argument("--empty-guide", choices=EMPTY_GUIDES, default="eos",
                   help="last window, empty guide: map to the empty prompt's EOS (eos) or BOS (bos, the official code)")
    p.add_argument("--no-preserve-unconditional", action="store_true",
                   help="keep only the empty prompt's BOS, not its keys/values at every edited position")
    p.add_argument("--official", choices=OFFICIAL, default="off",
                   help="follow an official script of rohitgandikota/unified-concept-editing instead of the pack's "
                        "choices (token positions, preserve handling, absolute λ; concepts, guide, preserve, λ, scales "
                        "and --expand stay yours): " + "; ".join(f"{k}: {v}" for k, v in OFFICIAL_SOURCES.items()))
    g = p.add_argument_group("closed-loop debias (--mode debias --loop): edit, generate, judge, re-solve")
    g.add_argument("--loop", action="store_true",
                   help="iterate the debias edit until every option's share is within --tolerance of its weight")
    g.add_argument("--tolerance", type=float, default=0.05)
    g.add_argument("--max-iterations", type=int, default=10)
    g.add_argument("--samples", type=int, default=10, help="pictures per concept per round")
    g.add_argument("--sample-steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--clip-vision", default=None,
                   help="a CLIP vision .safetensors that pairs with the checkpoint's text tower (SDXL: CLIP-G) as "
                        "the judge; without it the unedited model judges by presence")
    p.add_argument("--out", required=True, help="edit file to write (.safetensors)")
    p.set_defaults(func=run)


def read_concepts(path: str) -> list[str]:
    """Concept lines from .txt (as the node reads its text box) or .csv (concept[, target])."""
    from ..editing.errors import InvalidInputError
    if not os.path.isfile(path):
        raise InvalidInputError(f"no concept file at {path}")
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith(".csv"):
            rows = [r for r in csv.reader(f) if r and r[0].strip() and not r[0].lstrip().startswith("#")]
            if rows and rows[0][0].strip().lower() in ("concept", "source"):
                rows = rows[1:]  # header
            return [f"{r[0].strip()} -> {r[1].strip()}" if len(r) > 1 and r[1].strip() else r[0].strip() for r in rows]
        out = []
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
        return out


def settings(args, concepts: list[str], preserve: list[str]):
    """The UCEConfig of a parsed `uce` command line, given its concept and preserve lines."""
    from ..editing.uce.closed_form import script_preserve_scale
    from ..editing.uce.config import UCEConfig
    config = UCEConfig(concepts=concepts, mode=args.mode, guide=args.guide, preserve=preserve,
                       default_preserve=not args.no_default_preserve, lam=args.lam, lam_mode=args.lam_mode,
                       erase_scale=args.erase_scale, token_window=args.token_window, expand=args.expand,
                       empty_guide=args.empty_guide, preserve_unconditional=not args.no_preserve_unconditional,
                       official=args.official)
    if args.preserve_scale is not None:
        config.preserve_scale = args.preserve_scale
    else:
        config.preserve_scale = script_preserve_scale(args.official, preserve)
    return config


def run(args) -> int:
    from ..comfy_host.jobs import UCEJob, run as run_job
    from .common import load_clip_vision, load_model, terminal_context

    config = settings(args, read_concepts(args.concepts), read_concepts(args.preserve) if args.preserve else [])
    config.validate()
    job = UCEJob(settings=config)
    if args.loop:
        from ..editing.errors import InvalidInputError
        from ..editing.uce.config import DebiasConfig
        if args.mode != "debias":
            raise InvalidInputError("--loop iterates a debias edit: add --mode debias and --guide 'a:0.5, b:0.5'")
        job.loop = DebiasConfig(tolerance=args.tolerance, max_iterations=args.max_iterations, samples=args.samples,
                                steps=args.sample_steps, cfg=args.cfg, seed=args.seed)
        job.loop.validate()
    if args.clip_vision:
        if not args.loop:
            raise SystemExit("--clip-vision is the debias loop's judge: add --loop")
        model, clip, vae = load_model(args.ckpt, cpu=args.cpu, vae=True)
        job.judge, job.vae = load_clip_vision(args.clip_vision), vae
    else:
        model, clip = load_model(args.ckpt, cpu=args.cpu)
    edit = run_job("uce", model, clip, job, terminal_context()).edit
    edit.save(args.out)
    m = edit.metrics
    log.info("wrote %s: %d concepts, %d layers (%s), preserve prompts' K/V moved %.2f%% (max %.2f%%), "
             "target residual %.3g", args.out, len(edit.concepts), m["layers"], m["storage"],
             100 * m["preserve_rel_change_mean"], 100 * m["preserve_rel_change_max"], m["target_residual_mean"])
    if "debias" in m:
        from ..editing.uce.debias import report_text
        log.info("%s", report_text(edit))
    return 0
