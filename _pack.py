"""Load this repository as the package ``conceptedit`` whatever its folder is called (ComfyUI
clones it as e.g. ``ComfyUI-ConceptEdit``), for the command line, benchmarks and tests."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def load(name: str = "conceptedit"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
