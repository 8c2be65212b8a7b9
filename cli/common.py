"""What the sub-commands share: loading a checkpoint through ComfyUI, progress on the terminal."""
from __future__ import annotations

import logging
import os
import sys

from ..editing.hosts import PhaseRate, RunContext, time_left_text

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_FLUX = "tiny-flux"
TINY_QWEN_IMAGE = "tiny-qwen-image"


def add_model_arg(p) -> None:
    p.add_argument("--ckpt", default=TINY,
                   help="checkpoint file (.safetensors: SD1.x/SD2.x/SDXL, SD3/Flux with their text encoders inside), "
                        "'tiny' for the bundled tiny model, 'tiny-flux' / 'tiny-qwen-image' for the bundled tiny Flux / "
                        "Qwen-Image (these two need ComfyUI 0.3.75 or later: COMFYUI_PATH)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def setup_distributed(cpu: bool = False) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment): set up the process group (NCCL on GPUs, gloo
    on CPUs or with --cpu; `editing.distributed.init_from_env`) and tear it down at exit. Before the
    model loads, so that each process loads it on its own GPU. Returns whether this run is distributed."""
    import atexit

    from ..editing import distributed
    if not distributed.init_from_env(cpu=cpu):
        return False
    atexit.register(distributed.shutdown)
    return True


def start_data_parallel(cpu: bool = False) -> None:
    """`setup_distributed` for the trainings that split each batch's rows (unlearn, distill), saying
    which process this is."""
    from ..editing import distributed
    if setup_distributed(cpu):
        import torch
        log.info("data parallel: process %d of %d on %s", distributed.rank(), distributed.world(),
                 "cuda" if torch.cuda.is_available() and not cpu else "cpu")


def write_trained(edit, out: str) -> bool:
    """Save a trained edit: under torchrun rank 0 alone writes it, recording how many processes
    trained it. Returns whether this process wrote."""
    from ..editing import distributed
    if distributed.active():
        edit.params["data_parallel_processes"] = distributed.world()
        if not is_writer():
            return False
    edit.save(out)
    return True


def is_writer() -> bool:
    """Whether this process writes the command's output: always, except the ranks other than 0 of a
    torchrun job (they compute their share and write nothing)."""
    from ..editing import distributed
    return distributed.is_main()


def load_model(ckpt: str, cpu: bool = False, vae: bool = False):
    """(MODEL, CLIP) as ComfyUI objects, through ComfyUI's own checkpoint loader; (MODEL, CLIP, VAE)
    with `vae`. Under torchrun the process group is set up first (`setup_distributed`)."""
    from ..comfy_host.locate import ensure_comfy
    setup_distributed(cpu)
    ensure_comfy(cpu=True if cpu else None)
    if ckpt in (TINY, TINY_FLUX, TINY_QWEN_IMAGE):
        if ckpt == TINY:
            from ..tiny.comfy_model import load_tiny as load
        elif ckpt == TINY_FLUX:
            from ..tiny.flux import load_tiny_flux as load
        else:
            from ..tiny.qwen_image import load_tiny_qwen_image as load
        try:
            model, clip, tiny_vae = load()
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        return (model, clip, tiny_vae) if vae else (model, clip)
    if not os.path.isfile(ckpt):
        raise SystemExit(f"no checkpoint at {ckpt}")
    if not ckpt.endswith(".safetensors"):
        raise SystemExit(f"{ckpt}: only .safetensors checkpoints are read (nothing is unpickled)")
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=vae, output_clip=True)
    return (out[0], out[1], out[2]) if vae else (out[0], out[1])


def load_clip_vision(path: str):
    """A ComfyUI CLIP_VISION from a .safetensors file (ComfyUI's own loader, as CLIPVisionLoader)."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        raise SystemExit(f"{path}: need a CLIP vision .safetensors file (nothing is unpickled)")
    import comfy.clip_vision
    return comfy.clip_vision.load(path)


def terminal_context() -> RunContext:
    """The terminal's progress line with the time left of the current phase (`PhaseRate`)."""
    phase = PhaseRate()
    state = {"last": -1, "total": None}

    def progress(done: int, total: int) -> None:
        if not is_writer():  # one bar per job: rank 0's
            return
        left = phase.seconds_left(done, total)
        pct = int(100 * done / max(total, 1))
        if pct != state["last"] or total != state["total"]:
            state.update(last=pct, total=total)
            eta = f", {time_left_text(left)} left   " if left is not None else "   "
            sys.stderr.write(f"\r{done}/{total} ({pct}%){eta}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return RunContext(progress=progress)
