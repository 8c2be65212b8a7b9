"""The pack as ComfyUI sees it: registered by ComfyUI's own loader, guarded outside it, and the
library never importing ComfyUI."""
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_in_real_comfyui(comfy, pack):
    from conceptedit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    ours = {k for k in comfy.NODE_CLASS_MAPPINGS if k.startswith("ConceptEdit")}
    assert {"ConceptEditSaveEdit", "ConceptEditLoadEdit", "ConceptEditApplyEdit"} <= ours
    assert ours == set(NODE_CLASS_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert comfy.NODE_DISPLAY_NAME_MAPPINGS[name] == NODE_DISPLAY_NAME_MAPPINGS[name]
        spec = cls.INPUT_TYPES(include_hidden=False)
        for group in spec.values():
            for inp, (typ, *opts) in group.items():
                assert opts and "tooltip" in opts[0], f"{name}.{inp} has no tooltip"
        assert getattr(cls, "DESCRIPTION", ""), name
        assert callable(getattr(cls(), cls.FUNCTION))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_outside_comfyui_registers_nothing_and_fails_nothing():
    r = _run("import _pack, sys; m = _pack.load(); assert m.NODE_CLASS_MAPPINGS == {}; "
             "assert not hasattr(m, 'comfy_entrypoint') and m.WEB_DIRECTORY == './web'; "
             "assert not any(k == 'comfy' or k.startswith('comfy.') or k.startswith('comfy_api') for k in sys.modules), "
             "'comfy imported'")
    assert r.returncode == 0, r.stderr


def test_library_never_imports_comfyui():
    # import every library module with ComfyUI made unimportable
    code = ("import sys, importlib, pkgutil\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('comfy', 'nodes', 'folder_paths', 'comfy_extras', 'server'):\n"
            "            raise ImportError('editing/ imported ComfyUI: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import _pack; pkg = _pack.load()\n"
            "import conceptedit.editing as e\n"
            "names = [m.name for m in pkgutil.walk_packages(e.__path__, 'conceptedit.editing.')]\n"
            "assert 'conceptedit.editing.uce.closed_form' in names, names\n"
            "for n in names:\n"
            "    importlib.import_module(n)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_install_py_is_idempotent_when_satisfied():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pip" not in r.stdout.lower()


def test_install_py_uses_a1111_launch_when_present(tmp_path):
    # A1111 provides `launch.run_pip`; install.py must use it (and not pip directly) there.
    (tmp_path / "launch.py").write_text("calls = []\ndef run_pip(cmd, desc=None):\n    calls.append(cmd)\n")
    req = tmp_path / "pack"
    req.mkdir()
    (req / "requirements.txt").write_text("surely-not-installed-pkg-xyz\n")
    (req / "install.py").write_text(open(os.path.join(ROOT, "install.py")).read())
    code = ("import sys; sys.path.insert(0, %r); import launch; "
            "import runpy; runpy.run_path(%r, run_name='install'); "
            "print(launch.calls)") % (str(tmp_path), str(req / "install.py"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "surely-not-installed-pkg-xyz" in r.stdout


def test_library_never_imports_the_tiny_model():
    """editing/ gets the tiny world injected (editing.worlds, registered by the pack's __init__)."""
    import re
    lib = os.path.join(ROOT, "editing")
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(lib) for n in names if n.endswith(".py"))
    assert any(f.endswith(os.path.join("unlearn", "trainer.py")) for f in files), "the scan missed the method packages"
    bad = [f"{os.path.relpath(f, lib)}:{i}" for f in files for i, line in enumerate(open(f), 1)
           if re.match(r"\s*(from\s+(\.\.+)?tiny\b|import\s+tiny\b)", line)]
    assert not bad, f"editing/ imports tiny/: {bad}"


def test_license_is_apache_2_and_the_registry_reads_it():
    """The Comfy Registry needs a license: Apache-2.0, as a LICENSE file the pyproject names."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == {"file": "LICENSE"}
    with open(os.path.join(ROOT, project["license"]["file"]), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
