"""Install this pack's Python requirements with the running interpreter. Idempotent.

ComfyUI-Manager runs this file after cloning (with ComfyUI's Python); Automatic1111/Forge run it
with their own `launch` module available. Torch is never installed here: the host has it.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQ = os.path.join(HERE, "requirements.txt")


def _requirements() -> list[str]:
    with open(REQ, encoding="utf-8") as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def _missing(reqs: list[str]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for r in reqs:
        name = r
        for sep in ("<", ">", "=", "!", "~", "[", ";"):
            name = name.split(sep, 1)[0]
        try:
            version(name.strip())
        except PackageNotFoundError:
            out.append(r)
    return out


def main() -> int:
    missing = _missing(_requirements())
    if not missing:
        return 0
    try:  # inside Automatic1111/Forge: use their installer (it knows their index and venv)
        import launch  # type: ignore[import-not-found]
    except ImportError:
        launch = None
    for req in missing:
        if launch is not None and hasattr(launch, "run_pip"):
            launch.run_pip(f'install "{req}"', f"ConceptEdit requirement: {req}")
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", req])
    return 0


if __name__ == "__main__" or "launch" in sys.modules:
    main()
