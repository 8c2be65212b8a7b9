"""`conceptedit demo`: the main job on the bundled tiny model, end to end.

Erases one concept (default: the colour "red") with one method, measures efficacy,
paraphrase robustness and specificity before and after with the tiny world's classifier, saves the
edit file, and writes a before/after picture. Runs on the CPU in a few minutes.
"""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)

METHODS = ("uce", "prune")


def register(sub) -> None:
    p = sub.add_parser("demo", help="erase a concept from the bundled tiny model and show before/after")
    p.add_argument("--concept", default="red", help="a tiny-world concept: a shape, colour or style "
                   "(e.g. red, circle, monet)")
    p.add_argument("--method", choices=METHODS, default="uce", help="uce: closed-form cross-attention edit "
                   "(seconds; erases colours and circles); prune: ConceptPrune skilled-neuron masks (a minute; "
                   "on the tiny model it erases triangles, see README)")
    p.add_argument("--out", default="out/demo", help="folder for the pictures, the edit and metrics.json")
    p.add_argument("--prompts", type=int, default=6, help="prompts per concept for the metrics")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt for the metrics")
    p.set_defaults(func=run)


def erase(method: str, concept: str, model, clip, ctx):
    """The edit and the patched model, through the same functions the nodes use."""
    if method == "uce":
        from ..editing.uce.config import UCEConfig
        from ..comfy_host.jobs import UCEJob, run as run_job
        cfg = UCEConfig(concepts=[concept], mode="erase", guide="", token_window="last")
        out = run_job("uce", model, clip, UCEJob(settings=cfg), ctx)
        return out.model, out.edit
    from ..comfy_host.jobs import ConceptPruneJob, run as run_job
    from ..editing.concept_prune.config import PruneConfig
    from ..editing.prompts import TINY_DEFAULTS
    out = run_job("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=PruneConfig(**TINY_DEFAULTS)),
                                   ctx)
    return out.model, out.edit


def run(args) -> int:
    import torch

    from ..editing.audit.evaluate import erasure_report, write_grid
    from ..tiny import world
    from .common import load_model, terminal_context

    os.makedirs(args.out, exist_ok=True)
    world.kind_of(args.concept)  # unknown concept -> a clear error listing the known ones
    model, clip = load_model("tiny", cpu=True)
    from ..tiny.comfy_model import comfy_sampler
    kind = world.kind_of(args.concept)
    others = [c for c in world.CONCEPTS[kind] if c != args.concept and world.words(c)]

    def report(m):
        return erasure_report(comfy_sampler(m, clip), [args.concept], others, n_prompts=args.prompts,
                              samples_per_prompt=args.samples)

    with torch.inference_mode():
        t0 = time.time()
        before = report(model)
        t_eval = time.time() - t0
        t0 = time.time()
        model2, edit = erase(args.method, args.concept, model, clip, terminal_context())
        t_edit = time.time() - t0
        after = report(model2)
        path = edit.save(os.path.join(args.out, f"erase_{args.concept}_{args.method}.safetensors"))
        grid_prompts = [p for p, _ in world.prompts_for(args.concept, 3)] + \
                       [p for c in others[:3] for p, _ in world.prompts_for(c, 1)]
        seeds = list(range(len(grid_prompts)))
        rows = [comfy_sampler(m, clip)(grid_prompts, seeds) for m in (model, model2)]
        pic = write_grid(os.path.join(args.out, f"before_after_{args.concept}.png"), rows,
                         ["original", f"{args.concept} erased"])
    metrics = {"concept": args.concept, "method": args.method, "before": before, "after": after,
               "edit_seconds": round(t_edit, 2), "eval_seconds": round(t_eval, 2), "edit_file": path,
               "picture": pic, "grid_prompts": grid_prompts}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    c = args.concept
    spec_b = sum(before["specificity"].values()) / max(1, len(before["specificity"]))
    spec_a = sum(after["specificity"].values()) / max(1, len(after["specificity"]))
    print(f"erase {c!r} with {args.method} ({t_edit:.1f} s):")
    print(f"  presence of {c} on its prompts      {before['efficacy'][c]:6.1%} -> {after['efficacy'][c]:6.1%}")
    if c in before["paraphrase"]:
        print(f"  presence of {c} on synonym prompts  {before['paraphrase'][c]:6.1%} -> {after['paraphrase'][c]:6.1%}")
    print(f"  accuracy on the other {kind}s         {spec_b:6.1%} -> {spec_a:6.1%}")
    print(f"picture: {pic}\nedit:    {path}\nmetrics: {os.path.join(args.out, 'metrics.json')}")
    return 0
