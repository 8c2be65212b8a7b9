"""`conceptedit redteam --ckpt tiny --edit red_uce.safetensors --concept red --prompt "a red circle"`:
the red-team audit of an edit file: prompt attacks (adversarial prefix, embedding match, concept
inversion) and, for pruning masks, weight revival; prints the report, optionally writes JSON and
the picture grid.

Several GPUs or machines: `torchrun --nproc-per-node N conceptedit.py redteam ...` splits the attacks
(and revival fractions) over the processes; rank 0 prints and writes (docs/distributed.md)."""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..editing.redteam.runner import ATTACKS
    from ..editing.redteam.soft import AttackConfig
    from .common import add_model_arg
    d = AttackConfig()
    p = sub.add_parser("redteam", help="red-team audit: can a prompt (or a few restored weights) bring an erased "
                                       "concept back? Under torchrun the attacks are split over the processes")
    add_model_arg(p)
    p.add_argument("--edit", required=True, help="the edit file to attack (.safetensors from any ConceptEdit method)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt showing the concept (repeatable)")
    p.add_argument("--concept", default="", help="the concept's words, taken out of the prompts for the model's own "
                                                 "presence score (on the tiny model also the classifier's label)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    p.add_argument("--no-revival", action="store_true", help="skip the weight-revival measurement of pruning masks")
    for name in ("steps", "tokens", "samples", "sample_steps", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "cfg", "time_limit_s"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--grid", default=None, help="write the picture grid (original / edited / each attack) as PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..comfy_host.view import apply_edit
    from ..comfy_host.audits import red_team_grid, red_team_models
    from ..editing.edit import Edit
    from ..editing.redteam.runner import RedTeamConfig
    from ..editing.redteam.soft import AttackConfig
    from .common import is_writer, load_model, terminal_context

    cfg = RedTeamConfig(attacks=tuple(a.strip() for a in args.attacks.split(",") if a.strip()),
                        revival=not args.no_revival,
                        attack=AttackConfig(steps=args.steps, tokens=args.tokens, lr=args.lr, samples=args.samples,
                                            images=args.samples, sample_steps=args.sample_steps, cfg=args.cfg,
                                            seed=args.seed, time_limit_s=args.time_limit_s)).validate()
    model, clip, vae = load_model(args.ckpt, cpu=args.cpu, vae=True)
    edit = Edit.load(args.edit)
    edited, edited_clip, warnings = apply_edit(model, clip, edit)  # validates family, layout and shapes first
    for w in warnings:
        log.warning(w)
    report = red_team_models(edited, model, clip, args.prompt, cfg, edit=edit, edited_clip=edited_clip,
                             concept=args.concept, ctx=terminal_context())
    if not is_writer():  # torchrun: every process holds the whole report; rank 0 prints and writes it
        return 0
    print(report.to_text())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
    if args.grid:
        from PIL import Image
        grid = red_team_grid(report, model, vae)[0]
        Image.fromarray((grid.clamp(0, 1) * 255).byte().cpu().numpy()).save(args.grid)
    return 0
