"""`conceptedit distill --ckpt teacher.safetensors --student-edit prune.safetensors --concept X --out d.safetensors`:
bilevel distill-and-unlearn headless (the same code path as the Distill and Unlearn node). The
student is the teacher with a pruning edit applied (`--student-edit`: a ConceptPrune file or any
edit made for this teacher) or a checkpoint of its own read through the teacher's text encoder
(`--student`). The file written is the trained part: apply it together with the student edit, or to
the student checkpoint.

Several GPUs or machines (data parallel, torch.distributed):

    torchrun --nproc-per-node 4 conceptedit.py distill --ckpt teacher.safetensors --student-edit p.safetensors ...

Every process draws the same batch, computes its share of the rows, and the gradients are summed
over the processes before each optimiser step, so every process takes the step one process takes
on the whole batch. `--batch` is the whole batch (at least the number of processes). Rank 0
generates the teacher's training pictures and sends them, and writes the file (docs/distributed.md).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# DistillConfig fields that become options of the same name (the rest have options of their own)
_INTS = ("steps", "erase_every", "rank", "batch", "n_prompts", "gen_steps", "seed", "warmup_steps")
_FLOATS = ("lr_distill", "lr_erase", "w_out", "w_feat", "min_snr_gamma", "eta", "gen_cfg")
_HELP = {"steps": "optimiser steps in all", "erase_every": "every n-th step is an erase step (10: 9 distillation "
         "steps, then 1)", "rank": "LoRA rank", "batch": "pictures per step (the whole batch under torchrun)",
         "n_prompts": "templated erase prompts", "gen_steps": "sampling steps of the teacher's training pictures",
         "warmup_steps": "linear warm-up of both learning rates over this many steps (0: none)",
         "w_out": "output KD weight", "w_feat": "feature KD weight",
         "min_snr_gamma": "Min-SNR-γ of the diffusion loss (0: the model's own objective)",
         "eta": "η of the erase target", "gen_cfg": "CFG scale of the teacher's training pictures"}


def register(sub) -> None:
    from ..editing.distill.config import FEATURE_KD, KEEP_PRUNED, OFFICIAL, DistillConfig
    from ..editing.training import PARAM_SETS
    from .common import add_model_arg
    d = DistillConfig()
    p = sub.add_parser("distill", help="distil a pruned student from the full model while erasing a concept "
                                       "(bilevel distill-and-unlearn)")
    add_model_arg(p)  # --ckpt: the teacher
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student-edit", help="an edit file made for the teacher (a ConceptPrune mask …): the student "
                                            "is the teacher with it applied")
    who.add_argument("--student", help="a student checkpoint of its own (.safetensors; blocks removed, other widths) "
                                       "that reads the teacher's text encoder")
    p.add_argument("--concept", default="", help="the concept to erase while distilling (empty: distillation only)")
    p.add_argument("--distill-prompt", action="append", default=[],
                   help="a prompt of the distillation pictures (repeatable; default: the concept-free twins of the "
                        "erase prompts)")
    for name in _INTS + _FLOATS:
        p.add_argument("--" + name.replace("_", "-"), type=int if name in _INTS else float, default=getattr(d, name),
                       help=f"{_HELP.get(name, name.replace('_', ' '))} (default {getattr(d, name)})")
    p.add_argument("--params", choices=PARAM_SETS, default=d.param_set, help="what trains (lora by default)")
    p.add_argument("--keep-pruned", choices=KEEP_PRUNED, default=d.keep_pruned,
                   help="mask: pruned weights stay exactly zero; skip: pruned layers do not train; "
                        "off: they may regrow")
    p.add_argument("--feature-kd", choices=FEATURE_KD, default=d.feature_kd,
                   help="levels: mean over the UNet's level outputs (the paper's code); "
                        "blocks: sum over transformer blocks")
    p.add_argument("--official", choices=OFFICIAL, default=d.official,
                   help="bilevel: the official code's loop (one process only)")
    p.add_argument("--out", default=None, help="edit file to write (default: distill_<concept>.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..comfy_host.jobs import DistillJob, run as run_job
    from ..comfy_host.view import apply_edit
    from ..editing.distill.config import DistillConfig
    from ..editing.edit import Edit
    from .common import load_model, start_data_parallel, terminal_context, write_trained

    cfg = DistillConfig(**{k: getattr(args, k) for k in _INTS + _FLOATS}, param_set=args.params,
                        keep_pruned=args.keep_pruned, feature_kd=args.feature_kd, official=args.official,
                        erase=bool(args.concept.strip())).validate()
    ctx = terminal_context()
    start_data_parallel(args.cpu)  # before the model loads: it selects this process's GPU
    teacher, clip = load_model(args.ckpt, cpu=args.cpu)
    if args.student_edit:
        # validated against the teacher (family, layout, shapes, scope) before anything is applied
        student, _clip, warnings = apply_edit(teacher, clip, Edit.load(args.student_edit))
        for w in warnings:
            log.warning("student edit: %s", w)
    else:
        student, _ = load_model(args.student, cpu=args.cpu)
    job = DistillJob(teacher=teacher, concept=args.concept, settings=cfg, distill_prompts=args.distill_prompt)
    edit = run_job("distill_unlearn", student, clip, job, ctx).edit
    out = args.out or f"distill_{(args.concept.strip() or 'only').replace(' ', '-')[:60]}.safetensors"
    if not write_trained(edit, out):
        return 0
    h = edit.metrics["history"]
    erase = [loss for _, loss in h["erase"]]
    log.info("wrote %s: %d weights changed (apply it with the student%s); distillation loss %.4f -> %.4f%s; "
             "%.2f steps/s", out, len(edit.changes), " edit" if args.student_edit else "", h["distill"][0],
             h["distill"][-1], f", erase loss {erase[0]:.4f} -> {erase[-1]:.4f}" if erase else "",
             edit.metrics["steps_per_s"])
    return 0
