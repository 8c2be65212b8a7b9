"""`conceptedit export-lora e.safetensors --out x.safetensors`: an edit file as a kohya LoRA that
stock ComfyUI LoraLoader, Automatic1111 and diffusers load (see editing/export/lora.py for the forms)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..editing.export.lora import DTYPES
    from .common import add_model_arg
    p = sub.add_parser("export-lora", help="write an edit file as a LoRA (kohya format)")
    p.add_argument("edit", help="an edit file (.safetensors) from any ConceptEdit method")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--rank", type=int, default=0, help="rank cap per layer (0 = exact / error-driven)")
    p.add_argument("--max-rel-error", type=float, default=0.01, help="dense edits: largest SVD error per layer")
    p.add_argument("--dense-as", choices=("svd", "diff"), default="svd")
    p.add_argument("--unet-names", choices=("auto", "diffusers", "ldm"), default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    add_model_arg(p)
    p.epilog = "--ckpt is needed only for pruning masks (their LoRA form depends on the base weights)."
    p.set_defaults(func=run)


def run(args) -> int:
    from ..editing.edit import Edit
    from ..editing.export.lora import LoraExportConfig, save_lora
    from .common import terminal_context

    edit = Edit.load(args.edit)
    cfg = LoraExportConfig(rank=args.rank, max_rel_error=args.max_rel_error, dense_as=args.dense_as,
                           unet_names=args.unet_names, dtype=args.dtype)
    cfg.validate()
    base = None
    if any(c.kind == "mask" for c in edit.changes.values()):
        from ..comfy_host.patches import clip_state, original_weights
        from .common import load_model
        model, clip = load_model(args.ckpt, cpu=args.cpu)
        base = {**original_weights(model), **clip_state(clip)}
    rep = save_lora(edit, args.out, cfg, base=base, ctx=terminal_context())
    log.info("wrote %s: %d modules (%d diff), max rank %d, max relative error %.3g, %.1f MB", args.out, rep["modules"],
             rep["diff_modules"], rep["max_rank"], rep["max_rel_error"], rep["bytes"] / 1e6)
    return 0
