"""`conceptedit emcid --ckpt tiny --pairs FILE.csv --out e.safetensors`: EMCID text-encoder edit
headless (the same code path as the Text Encoder Edit node), written as an edit file.

Several GPUs or machines: `torchrun --nproc-per-node N conceptedit.py emcid ...` splits the stage-1
concepts and C₀'s captions over the processes; rank 0 writes the file (docs/distributed.md)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def register(sub) -> None:
    from .common import add_model_arg
    p = sub.add_parser("emcid", help="text-encoder edit (EMCID): map 1-1000 source concepts to destinations")
    add_model_arg(p)
    p.add_argument("--pairs", required=True,
                   help="a .csv/.txt file, one 'source,destination' or 'source -> destination' per line")
    p.add_argument("--out", required=True, help="edit file to write (.safetensors)")
    p.add_argument("--lam", type=float, default=None,
                   help="λ, weight of generic-text preservation (default: the family's official value, e.g. SD 4000, "
                        "SDXL 4000 CLIP-L / 10000 bigG, per key dimension: scaled to this text encoder's width)")
    p.add_argument("--lam-mode", choices=["relative", "absolute"], default=None,
                   help="how --lam counts: relative = per dimension of each edited layer's keys, absolute = the "
                        "paper's λ (default: absolute when --lam is given, relative for the family's value)")
    p.add_argument("--steps", type=int, default=None, help="stage-1 Adam steps per concept (default: the family's)")
    p.add_argument("--no-stage1", action="store_true",
                   help="skip stage 1: target = the destination's own text features (no diffusion model runs)")
    p.add_argument("--template", action="append", default=None,
                   help="a prompt with '{}' for the concept (repeatable); default: '{}', 'a photo of {}', ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", choices=["off", "emcid"], default="off",
                   help="emcid: the official EMCID code's procedure (github SilentView/EMCID, commit 10a392a) for these "
                        "pairs, templates, λ and steps: SD1.4/SDXL hyper-parameters, λ absolute, C0 from 100k captions "
                        "in float32, stage 1 always on (50 steps, CFG 7.5), the official text path; off: the pack's")
    p.add_argument("--stage1-batch", type=int, default=0,
                   help="stage 1: concepts optimised together (0 = automatic: free GPU memory, 8 on a CPU; 1 = one at a time)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "conceptedit", "emcid"),
                   help="where C0 and stage-1 targets are cached, each concept as it finishes, so a stopped run "
                        "resumes ('' = no cache)")
    p.set_defaults(func=run)


def read_pairs(path: str) -> list[tuple[str, str]]:
    """Pairs from a file; a first line 'source,destination' is taken as a header."""
    from ..editing.emcid.stage2 import parse_pairs
    from ..editing.errors import InvalidInputError
    if not os.path.isfile(path):
        raise InvalidInputError(f"no pairs file at {path}")
    with open(path, encoding="utf-8") as f:
        pairs = parse_pairs(f.read())
    if pairs and pairs[0][0].lower() in ("source", "concept") and pairs[0][1].lower() in ("destination", "target"):
        pairs = pairs[1:]
    return pairs


def run(args) -> int:
    from ..comfy_host.jobs import EmcidJob, run as run_job
    from ..editing.emcid.stage2 import validate_pairs
    from ..editing.emcid.config import DEFAULT_TEMPLATES, EmcidConfig
    from .common import is_writer, load_model, terminal_context

    pairs = read_pairs(args.pairs)
    validate_pairs(pairs)
    cfg = EmcidConfig(lam=args.lam, lam_mode=args.lam_mode, steps=args.steps, use_stage1=not args.no_stage1,
                      templates=tuple(args.template) if args.template else DEFAULT_TEMPLATES, seed=args.seed,
                      official=args.official, stage1_batch=args.stage1_batch)
    cfg.validate()
    model, clip = load_model(args.ckpt, cpu=args.cpu)
    edit = run_job("emcid", model, clip, EmcidJob(pairs=pairs, settings=cfg, cache_dir=args.cache_dir or None), terminal_context()).edit
    if not is_writer():  # torchrun: rank 0 writes the edit
        return 0
    edit.save(args.out)
    gaps = {e: round(m["gap_after"], 4) for e, m in edit.metrics["stage2"].items()}
    log.info("wrote %s: %d concepts, %d fc2 layers; target gap left after stage 2: %s; %s s",
             args.out, len(pairs), len(edit.changes), gaps, edit.metrics["seconds"])
    return 0
