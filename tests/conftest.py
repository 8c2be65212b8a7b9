"""Test harness: a real ComfyUI ($COMFYUI_PATH, else ComfyUI 0.3.75 as `bash run.sh` installs it in
.venv/comfyui-0.3.75: comfy_host/locate.py) imported headless on the CPU, and this pack loaded into
it the way ComfyUI loads custom nodes.

The pack is loaded once, by ComfyUI's own `nodes.load_custom_node`, from a custom_nodes folder
that links to this repository, and is also reachable as ``conceptedit`` so that library tests
and node tests share one set of modules.
"""
from __future__ import annotations

import asyncio
import importlib.abc
import importlib.util
import inspect
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-ConceptEdit"
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

import _pack  # noqa: E402


def _load_comfy_and_pack():
    _pack.load("_conceptedit_bootstrap")  # only to reach comfy_host.locate without ComfyUI
    from _conceptedit_bootstrap.comfy_host.locate import ensure_comfy
    ensure_comfy(cpu=True)
    import folder_paths
    import nodes as comfy_nodes

    models = tempfile.mkdtemp(prefix="conceptedit-models-")
    folder_paths.folder_names_and_paths["concept_edits"] = ([os.path.join(models, "concept_edits")], {".safetensors"})
    folder_paths.set_output_directory(os.path.join(models, "output"))
    # previews (ui.PreviewImage) and the methods' caches go to the test's folder, not ComfyUI's own
    folder_paths.set_temp_directory(os.path.join(models, "temp"))
    folder_paths.folder_names_and_paths["concept_edits_cache"] = ([os.path.join(models, "cache")], set())
    custom = tempfile.mkdtemp(prefix="conceptedit-custom-nodes-")
    link = os.path.join(custom, PACK_NAME)
    os.symlink(ROOT, link)
    res = comfy_nodes.load_custom_node(link)
    if inspect.iscoroutine(res):
        res = asyncio.run(res)
    # ComfyUI names the module after the pack's whole path (sys.modules key): find it by its file
    pack = next((m for m in list(sys.modules.values())
                 if getattr(m, "__file__", None) == os.path.join(link, "__init__.py")), None)
    if res is False or pack is None:
        raise RuntimeError("ComfyUI failed to load the pack; see the traceback above")
    sys.modules["conceptedit"] = pack
    sys.meta_path.insert(0, _Alias(pack.__name__))
    for name in [n for n in sys.modules if n == "_conceptedit_bootstrap" or n.startswith("_conceptedit_bootstrap.")]:
        del sys.modules[name]
    return pack, comfy_nodes


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``conceptedit.x.y`` is the very module ComfyUI loaded as ``<pack name>.x.y`` (one set of
    classes and globals for library tests, node tests and monkeypatching)."""

    def __init__(self, real: str):
        self.real = real

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("conceptedit."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(self.real + spec.name[len("conceptedit"):])

    def exec_module(self, module):
        pass


PACK, COMFY_NODES = _load_comfy_and_pack()


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `nodes` module (the real one), with the pack registered in it."""
    return COMFY_NODES


@pytest.fixture
def one_thread():
    """One torch thread for the test: on small matrices and convolutions many threads only fight each
    other on a shared 2-core machine (20 s vs 0.1 s a diffusers forward)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def loras(comfy, tmp_path):
    """A temporary models/loras folder registered in ComfyUI's folder_paths."""
    import folder_paths
    old = folder_paths.folder_names_and_paths.get("loras")
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], set(folder_paths.supported_pt_extensions))
    getattr(folder_paths, "filename_list_cache", {}).pop("loras", None)
    yield tmp_path
    if old is not None:
        folder_paths.folder_names_and_paths["loras"] = old
    getattr(folder_paths, "filename_list_cache", {}).pop("loras", None)


@pytest.fixture(scope="session")
def pack():
    return PACK


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not os.environ.get("CONCEPTEDIT_SLOW"):
            item.add_marker(pytest.mark.skip(reason="slow tier: set CONCEPTEDIT_SLOW=1"))
