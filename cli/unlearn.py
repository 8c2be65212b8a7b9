"""`conceptedit unlearn --ckpt tiny --concept circle --out circle_rgd.safetensors`: unlearning by
fine-tuning (RGD / gradient ascent / ESD) headless; writes the trained LoRA/delta as an edit file.

Several GPUs or machines (data parallel, torch.distributed):

    torchrun --nproc-per-node 4 conceptedit.py unlearn --ckpt model.safetensors --concept X

Every process draws the same batch, computes its share of the rows, and the LoRA gradients are
summed over the processes (one float64 all-reduce per gradient) before RGD's projection, so every
process takes the step one process takes on the whole batch: the same edit as one process, faster.
`--batch` is the whole batch (at least the number of processes). Rank 0 generates the training
images and sends them, and writes the file. On CPUs (gloo): `torchrun --standalone --nproc-per-node 2
conceptedit.py unlearn --cpu ...`; docs/distributed.md has the multi-machine flags.
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ..editing.training import PARAM_SETS
    from ..editing.unlearn.trainer import PRESETS
    from ..editing.unlearn.config import ESD_PROMPTS, ESD_XT, METHODS, OFFICIAL, RETAIN_PAIRINGS, UnlearnConfig
    from .common import add_model_arg
    d = UnlearnConfig()
    p = sub.add_parser("unlearn", help="erase a concept by fine-tuning (RGD, gradient ascent or ESD); LoRA by default")
    add_model_arg(p)
    p.add_argument("--concept", required=True, help="the concept word or phrase to erase")
    p.add_argument("--retain", action="append", default=[], help="a prompt to keep unchanged (repeatable)")
    p.add_argument("--preset", choices=("custom", *PRESETS), default="custom",
                   help="esd-x / esd-u: Gandikota et al.'s settings (method, parameter set, steps, lr), in place of "
                        "--method/--params/--steps/--lr")
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--forget-objective", choices=("ascent", "esd"), default=d.forget_objective)
    p.add_argument("--params", choices=PARAM_SETS, default=d.param_set,
                   help="lora (default), lora-xattn, xattn (ESD-x) or noxattn (ESD-u)")
    for name in ("steps", "rank", "batch", "n_prompts", "gen_steps", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "alpha", "truncation", "ga_retain_weight", "eta", "gen_cfg"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--esd-ddim-steps", type=int, default=d.esd_ddim_steps)
    p.add_argument("--esd-cfg", type=float, default=d.esd_cfg)
    p.add_argument("--retain-pairing", choices=RETAIN_PAIRINGS, default=d.retain_pairing,
                   help="RGD/GA retain batch: each forget row's concept-free twin (default) or an independent draw")
    p.add_argument("--esd-xt", choices=ESD_XT, default=d.esd_xt,
                   help="ESD's x_t: sampled by partial DDIM with the concept (default, as the paper's code) or "
                        "generated images noised at random t")
    p.add_argument("--esd-prompt", choices=ESD_PROMPTS, default=d.esd_prompt,
                   help="ESD's c: the bare concept (default) or the templated forget prompts")
    p.add_argument("--official", choices=OFFICIAL, default=d.official,
                   help="esd: each step as ESD's train-esd.py (needs --method esd); rgd: as Ko et al.'s nsfw_RGD.py "
                        "with run-surgery.sh (needs --method rgd); both fine-tune the layers in full")
    p.add_argument("--cache-dir", default=None, help="keep the generated training latents here (safetensors)")
    p.add_argument("--out", default=None, help="edit file to write (default: unlearn_<method>_<concept>.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..comfy_host.jobs import UnlearnJob, run as run_job
    from ..editing.unlearn.trainer import preset_config
    from .common import load_model, start_data_parallel, terminal_context, write_trained

    cfg = preset_config(args.preset, method=args.method, forget_objective=args.forget_objective, param_set=args.params,
                        steps=args.steps, rank=args.rank, batch=args.batch, n_prompts=args.n_prompts,
                        gen_steps=args.gen_steps, seed=args.seed, lr=args.lr, alpha=args.alpha,
                        truncation=args.truncation, ga_retain_weight=args.ga_retain_weight, eta=args.eta,
                        gen_cfg=args.gen_cfg, cache_dir=args.cache_dir, retain_pairing=args.retain_pairing,
                        esd_xt=args.esd_xt, esd_prompt=args.esd_prompt, esd_ddim_steps=args.esd_ddim_steps,
                        esd_cfg=args.esd_cfg, official=args.official).validate()
    ctx = terminal_context()
    start_data_parallel(args.cpu)  # before the model loads: it selects this process's GPU
    model, clip = load_model(args.ckpt, cpu=args.cpu)
    job = UnlearnJob(concept=args.concept, settings=cfg, retain_prompts=args.retain or ())
    edit = run_job("unlearn", model, clip, job, ctx).edit
    out = args.out or f"unlearn_{cfg.method}_{args.concept.replace(' ', '-')[:60]}.safetensors"
    if not write_trained(edit, out):
        return 0
    h = edit.metrics["history"]
    log.info("wrote %s: %d weights changed; forget loss %.4f -> %.4f; %.2f steps/s",
             out, len(edit.changes), h["forget"][0], h["forget"][-1], edit.metrics["steps_per_s"])
    log.debug(json.dumps({k: v for k, v in edit.metrics.items() if k != "history"}))
    return 0
