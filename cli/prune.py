"""`conceptedit prune --ckpt tiny --concept circle --out circle.safetensors`: ConceptPrune headless,
writing the mask as an edit file (apply it with the Load/Apply Concept Edit nodes).

Under `torchrun --nproc-per-node N` the calibration prompts are split over the processes and their
statistics all-reduced; rank 0 writes the file (docs/distributed.md)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..editing.concept_prune.config import OFFICIAL, OFFICIAL_SOURCE
    from ..editing.prompts import PRESET_NAMES
    from .common import add_model_arg
    p = sub.add_parser("prune", help="ConceptPrune: erase concepts by pruning skilled FFN weights")
    add_model_arg(p)
    p.add_argument("--concept", action="append", required=True,
                   help="a concept to erase (repeat for several; they are pruned together)")
    p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="prompt pairs (default: 'tiny' for --ckpt tiny, else 'artist')")
    p.add_argument("--pairs", default="",
                   help="a text file of 'concept prompt | reference prompt' lines ({concept} = the concept)")
    p.add_argument("--skill-ratio", type=float, default=0.0, help="0 (default): the preset's (paper) value")
    p.add_argument("--tau", type=int, default=0, help="0 (default): the preset's (paper) value, at most --steps")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--full-trajectory", action="store_true",
                   help="run every step of the calibration generations (same mask; slower)")
    p.add_argument("--select-ratio", type=float, default=0.0,
                   help="prune weights skilled at more than select_ratio·τ of the first τ steps (0: the union, "
                        "as every published run)")
    p.add_argument("--official", choices=OFFICIAL, default="off",
                   help="concept-prune: the authors' procedure (PNDM calibration, their column norms, "
                        "k = int(ratio·4d); " + OFFICIAL_SOURCE + "); off: the pack's")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "conceptedit", "prune"),
                   help="where each batch of calibration statistics is cached as it finishes, so a stopped run "
                        "resumes ('' = no cache)")
    p.add_argument("--out", default=None, help="edit file to write (default: prune_<concepts>.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..editing.concept_prune.prune import with_preset_defaults
    from ..editing.concept_prune.config import PruneConfig
    from ..comfy_host.jobs import ConceptPruneJob, run as run_job
    from .common import TINY, TINY_FLUX, TINY_QWEN_IMAGE, is_writer, load_model, terminal_context

    preset = args.preset or (TINY if args.ckpt in (TINY, TINY_FLUX, TINY_QWEN_IMAGE) else "artist")
    pairs_text = ""
    if args.pairs:
        with open(args.pairs, encoding="utf-8") as f:
            pairs_text = f.read()
        preset = args.preset or "custom"
    config = with_preset_defaults(PruneConfig(skill_ratio=args.skill_ratio, tau=args.tau, steps=args.steps,
                                              cfg=args.cfg, seed=args.seed, batch_size=args.batch_size,
                                              full_trajectory=args.full_trajectory, select_ratio=args.select_ratio,
                                              official=args.official), preset)
    config.validate()
    model, clip = load_model(args.ckpt, cpu=args.cpu)
    job = ConceptPruneJob(concepts=args.concept, preset=preset, pairs_text=pairs_text, settings=config,
                          cache_dir=getattr(args, "cache_dir", "") or None)
    result = run_job("concept_prune", model, clip, job, terminal_context())
    edit = result.edit
    if not is_writer():  # torchrun: rank 0 writes the edit
        return 0
    for w in result.warnings:
        log.warning("%s", w)
    out = args.out or "prune_" + "_".join(c.replace(" ", "-") for c in args.concept)[:80] + ".safetensors"
    edit.save(out)
    m = edit.metrics
    log.info("wrote %s: %d weights pruned (%.3f%% of ff.net.2 weights) from %d generations in %.1fs",
             out, m["pruned_weights"], 100 * m["pruned_fraction_ffn"], m["generations"], m["seconds"])
    return 0
