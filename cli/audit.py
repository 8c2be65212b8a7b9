"""`conceptedit audit --ckpt tiny --edit circle_rgd.safetensors --prompt "a red circle"`: the
concept-resurgence audit of any edit file (fine-tune briefly on benign prompts, measure how much of
the concept comes back).

Several GPUs or machines: under `torchrun --nproc-per-node N conceptedit.py audit ...` the benign
fine-tune is data parallel (rank 0 draws the benign pictures and sends them; every process computes
its share of each batch's rows and the gradients are summed) and the presence readings' timesteps are
split over the processes; rank 0 prints and writes (docs/distributed.md)."""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from .common import add_model_arg
    p = sub.add_parser("audit", help="resurgence audit: does an erased concept come back after benign fine-tuning? "
                                     "Under torchrun the presence readings are split over the processes")
    add_model_arg(p)
    p.add_argument("--edit", required=True, help="the edit file to audit (.safetensors from any ConceptEdit method)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt showing the concept (repeatable)")
    p.add_argument("--concept", default=None, help="the erased concept's words (comma-separated): presence is measured "
                   "against each prompt without them (default: the edit's own concepts; '' for the empty prompt)")
    p.add_argument("--benign", action="append", default=[],
                   help="a benign prompt to fine-tune on (repeatable); with --benign-images, the images' captions")
    p.add_argument("--benign-images", default="", metavar="FOLDER",
                   help="fine-tune on your own images in FOLDER (a .txt caption beside each, else --benign) instead "
                        "of the original model's images")
    p.add_argument("--steps", default="10,25,50", help="checkpoints: benign steps at which presence is measured")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..comfy_host.view import apply_edit
    from ..editing.edit import Edit
    from ..editing.audit.resurgence import AuditConfig
    from ..comfy_host.audits import audit_models
    from .common import is_writer, load_model, terminal_context

    cfg = AuditConfig(checkpoints=tuple(int(s) for s in args.steps.split(",") if s.strip()), lr=args.lr,
                      rank=args.rank, seed=args.seed).validate()
    model, clip, vae = load_model(args.ckpt, cpu=args.cpu, vae=True) if args.benign_images else (
        *load_model(args.ckpt, cpu=args.cpu), None)
    edit = Edit.load(args.edit)
    edited, _, warnings = apply_edit(model, None, edit)  # validates family, layout and shapes first
    for w in warnings:
        log.warning(w)
    report = audit_models(edited, model, clip, args.prompt, args.benign, cfg, edit=edit, ctx=terminal_context(),
                          vae=vae, benign_folder=args.benign_images, concept=args.concept)
    if not is_writer():  # torchrun: every process holds the same report; rank 0 prints and writes it
        return 0
    print(report.to_text())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 0
