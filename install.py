"""Install this pack's Python requirements with the running interpreter. Idempotent.

ComfyUI-Manager runs this file after cloning (with ComfyUI's Python); Automatic1111/Forge run it
with their own `launch` module available. Torch is never installed here: the host has it.

Optional extras only when asked: `python install.py --with nudenet` (or CONCEPTEDIT_EXTRAS=nudenet
in the environment) also installs NudeNet 3.4.2 for the benchmark's nudity judge.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQ = os.path.join(HERE, "requirements.txt")


# extra name -> its pinned requirements (an extra is installed when its pin is not the installed version)
EXTRAS = {"nudenet": ["nudenet==3.4.2"]}
EXTRAS_ENV = "CONCEPTEDIT_EXTRAS"


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


def _extras(argv: list[str]) -> list[str]:
    """The extras asked for: `--with a,b` / `--with=a` in `argv`, and the CONCEPTEDIT_EXTRAS variable."""
    names = os.environ.get(EXTRAS_ENV, "").split(",")
    for i, a in enumerate(argv):
        if a == "--with" and i + 1 < len(argv):
            names += argv[i + 1].split(",")
        elif a.startswith("--with="):
            names += a.split("=", 1)[1].split(",")
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in EXTRAS]
    if unknown:
        raise SystemExit(f"install.py: unknown extra {unknown[0]!r}; the extras are: {', '.join(EXTRAS)}")
    return names


def _not_pinned(reqs: list[str]) -> list[str]:
    """The `name==version` pins whose package is missing or at another version."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for r in reqs:
        name, _, want = r.partition("==")
        try:
            if version(name.strip()) != want.strip():
                out.append(r)
        except PackageNotFoundError:
            out.append(r)
    return out


def main(argv=None) -> int:
    # argv only when run as a script: under Automatic1111 sys.argv is the host's own command line
    extras = _extras(sys.argv[1:] if argv is None and __name__ == "__main__" else list(argv or []))
    missing = _missing(_requirements()) + _not_pinned([r for e in extras for r in EXTRAS[e]])
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
