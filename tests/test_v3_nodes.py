"""The pack as ComfyUI V3 nodes: every node an io.ComfyNode whose schema validates, loaded through
ComfyUI's own loader by its V3 entry point, with the node IDs, inputs and outputs the V1 pack had
(workflows saved with it, tests/data/workflows_v1, still load and run), checks before the run through
ComfyUI's own validation, and a clear refusal on a ComfyUI without the V3 API."""
from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import os
import subprocess
import sys
import types

import pytest
from test_workflows import validate_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1_DIR = os.path.join(ROOT, "tests", "data", "workflows_v1")
V1_SPEC = os.path.join(V1_DIR, "nodes_v1.json")  # every input and output of the V1 pack, written from it
V1_WORKFLOWS = sorted(p for p in glob.glob(os.path.join(V1_DIR, "*.json")) if p != V1_SPEC)
# the node IDs of the V1 pack: public API, never renamed
V1_NODE_IDS = {
    "ConceptEditSaveEdit", "ConceptEditLoadEdit", "ConceptEditApplyEdit", "ConceptEditConceptPrune",
    "ConceptEditCrossAttentionEdit", "ConceptEditExportLoRA", "ConceptEditUCEDebias", "ConceptEditTextEncoderEdit",
    "ConceptEditTrainUnlearn", "ConceptEditResurgenceAudit", "ConceptEditRedTeamAudit", "ConceptEditDistillUnlearn",
    "ConceptEditEditInfo", "ConceptEditConceptPresence",
}
with open(V1_SPEC, encoding="utf-8") as _f:
    V1_NODES = json.load(_f)


def _nodes():
    from conceptedit import nodes
    return nodes


def _io():
    from comfy_api.latest import io
    return io


def _choices(spec) -> list | None:
    return spec[0] if isinstance(spec[0], list) else (spec[1].get("options") if spec[0] == "COMBO" else None)


# ---- the nodes are V3 --------------------------------------------------------------------------
def test_every_node_is_a_v3_node_with_a_valid_schema():
    io, nodes = _io(), _nodes()
    assert nodes.NODES and V1_NODE_IDS <= set(nodes.NODE_CLASS_MAPPINGS)
    for cls in nodes.NODES:
        assert issubclass(cls, io.ComfyNode), cls
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()  # unique ids, inputs apart from outputs
        assert schema.node_id.startswith("ConceptEdit") and schema.category == "ConceptEdit"
        assert schema.description and schema.display_name
        for i in schema.inputs:
            assert i.tooltip, f"{schema.node_id}.{i.id} has no tooltip"
        assert nodes.NODE_CLASS_MAPPINGS[schema.node_id] is cls


def test_node_ids_are_the_v1_ids_and_those_of_the_saved_workflows():
    from conceptedit.nodes import nodes_benchmark
    assert set(V1_NODES) == V1_NODE_IDS
    benchmark = {cls.define_schema().node_id for cls in nodes_benchmark.NODES}  # the node being added beside
    assert set(_nodes().NODE_CLASS_MAPPINGS) - benchmark == V1_NODE_IDS
    used = set()
    for path in V1_WORKFLOWS:
        with open(path) as f:
            used |= {n["type"] for n in json.load(f)["nodes"] if n["type"].startswith("ConceptEdit")}
    assert len(V1_WORKFLOWS) >= 6 and used and used <= V1_NODE_IDS


def test_the_pack_loads_through_comfyuis_loader_by_its_v3_entry_point(comfy, pack):
    """conftest loaded the pack with ComfyUI's own `nodes.load_custom_node`; the pack has no
    NODE_CLASS_MAPPINGS there, so its nodes can only have come in through comfy_entrypoint."""
    nodes = _nodes()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    assert pack.WEB_DIRECTORY == "./web"
    ext = asyncio.run(pack.comfy_entrypoint())
    from comfy_api.latest import ComfyExtension
    assert isinstance(ext, ComfyExtension) and asyncio.run(ext.get_node_list()) == nodes.NODES
    ours = {k for k in comfy.NODE_CLASS_MAPPINGS if k.startswith("ConceptEdit")}
    assert ours == set(nodes.NODE_CLASS_MAPPINGS)
    for node_id in ours:
        cls = comfy.NODE_CLASS_MAPPINGS[node_id]
        assert cls is nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
        assert comfy.NODE_DISPLAY_NAME_MAPPINGS[node_id] == nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]


# ---- what saved workflows rely on ---------------------------------------------------------------
@pytest.mark.parametrize("node_id", sorted(V1_NODE_IDS))
def test_every_v1_input_and_output_is_kept(comfy, node_id):
    """Saved workflows address widgets by position and outputs by slot: the V1 inputs keep their
    order, name, type, optional status, default and range (a range may only widen, a choice list
    only grow), the outputs their types and names."""
    v1 = V1_NODES[node_id]
    cls = comfy.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    now = [(name, section == "optional", s) for section in ("required", "optional")
           for name, s in spec.get(section, {}).items()]
    names = [n for n, _, _ in now]
    assert names[:len(v1["inputs"])] == [i["name"] for i in v1["inputs"]], "inputs renamed or reordered"
    assert all(opt for _, opt, _ in now[len(v1["inputs"]):]), "a new input must be optional"
    for old, (name, optional, s) in zip(v1["inputs"], now):
        kind, opts = str(s[0]) if not isinstance(s[0], list) else "COMBO", (s[1] if len(s) > 1 else {})
        where = f"{node_id}.{name}"
        assert kind == old["type"] and optional == old["optional"], where
        if "options" in old:
            assert set(old["options"]) <= set(_choices(s)), f"{where}: choices removed"
        if "default" in old and kind in ("INT", "FLOAT", "BOOLEAN", "COMBO"):
            assert opts.get("default") == old["default"], f"{where}: default changed"
        if "min" in old:
            assert opts["min"] <= old["min"] and opts["max"] >= old["max"], f"{where}: range narrowed"
    assert [[str(t), n] for t, n in zip(cls.RETURN_TYPES, cls.RETURN_NAMES)] == v1["outputs"]
    assert bool(cls.OUTPUT_NODE) == v1["output_node"]


@pytest.mark.parametrize("path", V1_WORKFLOWS, ids=[os.path.basename(p) for p in V1_WORKFLOWS])
def test_a_workflow_saved_with_the_v1_nodes_still_matches(comfy, path):
    """Node types registered, links of matching types, every widget value valid for today's input at
    its position (type, range, choice)."""
    with open(path) as f:
        validate_workflow(json.load(f), comfy.NODE_CLASS_MAPPINGS, os.path.basename(path))


def test_saved_widget_values_still_name_v1_inputs(comfy):
    """The widgets a saved workflow fills, by name: each still exists with the V1 type."""
    for path in V1_WORKFLOWS:
        with open(path) as f:
            wf = json.load(f)
        for n in wf["nodes"]:
            if n["type"] not in V1_NODES:
                continue
            v1 = [i for i in V1_NODES[n["type"]]["inputs"] if i["type"] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            spec = comfy.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
            now = {**spec["required"], **spec.get("optional", {})}
            values = [v for v in n["widgets_values"] if v not in ("fixed", "increment", "decrement", "randomize")]
            assert len(values) <= len(v1), f"{path}: {n['type']} stores more widgets than the V1 node had"
            for old, value in zip(v1, values):
                typ = now[old["name"]][0]
                assert (typ if not isinstance(typ, list) else "COMBO") == old["type"], (n["type"], old["name"])


# ---- UI outputs ---------------------------------------------------------------------------------
def test_ui_outputs_are_v3_node_outputs(comfy):
    import torch
    from conceptedit.editing import arch
    from conceptedit.editing.edit import Change, Edit
    io = _io()
    fam = arch.get_family("tiny")
    kk = fam.attn2_kv_keys()[0]
    shape = fam.expected_shapes()[kk]
    edit = Edit("uce", "tiny", {kk: Change("delta", shape, {"delta": torch.full(shape, 0.5)})}, concepts=["circle"],
                fingerprint={"family": "tiny"})
    out = comfy.NODE_CLASS_MAPPINGS["ConceptEditEditInfo"]().execute(edit)
    assert isinstance(out, io.NodeOutput) and isinstance(out[0], str)
    view = out.ui["conceptedit_edit"][0]  # what web/conceptedit.js reads
    assert view["heatmap"]["rows"] and "circle" in out[0]
    saved = comfy.NODE_CLASS_MAPPINGS["ConceptEditSaveEdit"]().execute(edit, "v3_ui")
    assert saved.ui.as_dict()["text"][0].startswith("saved v3_ui") and saved.result is None


# ---- search aliases -------------------------------------------------------------------------------
def test_search_aliases_reach_a_host_that_has_the_field(monkeypatch):
    """ComfyUI 0.3.75's Schema has no search_aliases: the pack leaves them out there. A host with the
    field (newer ComfyUI) gets them, and "erase", "unlearn", "nsfw" and "lora" each find nodes."""
    from conceptedit.nodes import common
    io = _io()
    has_field = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    ours = [_nodes().NODE_CLASS_MAPPINGS[k] for k in sorted(V1_NODE_IDS)]
    for cls in ours:
        assert bool(getattr(cls.define_schema(), "search_aliases", None)) == has_field

    @dataclasses.dataclass
    class NewerSchema(io.Schema):
        search_aliases: list = dataclasses.field(default_factory=list)

    monkeypatch.setattr(common, "io", types.SimpleNamespace(**{**vars(io), "Schema": NewerSchema}))
    monkeypatch.setattr(common, "_SCHEMA_FIELDS", frozenset(f.name for f in dataclasses.fields(NewerSchema)))
    found = {word: [] for word in ("erase", "unlearn", "nsfw", "lora")}
    for cls in ours:
        schema = cls.define_schema()
        assert schema.search_aliases, schema.node_id
        for word, ids in found.items():
            if any(word in a for a in schema.search_aliases):
                ids.append(schema.node_id)
    assert all(found.values()), found
    assert "ConceptEditExportLoRA" in found["lora"] and "ConceptEditConceptPrune" in found["nsfw"]


# ---- checks before the run -----------------------------------------------------------------------
def _defaults(cls) -> dict:
    """validate_inputs' widgets at their schema defaults."""
    import inspect
    schema = {i.id: i for i in cls.define_schema().inputs}
    names = [p for p in inspect.signature(cls.validate_inputs).parameters]
    return {n: getattr(schema[n], "default", None) for n in names}


VALID = {  # a value where the default is empty
    "ConceptEditCrossAttentionEdit": {"concepts": "van gogh"},
    "ConceptEditConceptPrune": {"concepts": "van gogh"},
    "ConceptEditTrainUnlearn": {"concept": "van gogh"},
    "ConceptEditResurgenceAudit": {"concept_prompts": "a painting by van gogh"},
    "ConceptEditRedTeamAudit": {"concept_prompts": "a painting by van gogh"},
    "ConceptEditConceptPresence": {"prompts": "a painting by van gogh"},
    "ConceptEditLoadEdit": {"edit_name": None},  # linked / the test install has no edit files
}


def test_validate_inputs_accepts_the_defaults():
    with_check = [c for c in _nodes().NODES if "validate_inputs" in c.__dict__]
    assert len(with_check) >= 10
    for cls in with_check:
        node_id = cls.define_schema().node_id
        values = {**_defaults(cls), **VALID.get(node_id, {})}
        assert cls.validate_inputs(**values) is True, (node_id, cls.validate_inputs(**values))


BAD = [  # node, changed widgets, words the message must contain
    ("ConceptEditCrossAttentionEdit", {"concepts": "  \n# nothing"}, "concept list is empty"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat\n-> dog"}, "no concept before '->'"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat", "mode": "debias", "guide": "male"}, "at least two options"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat", "mode": "redirect"}, "redirect needs a target"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat", "mode": "erasee"}, "not one of the choices"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat", "harden_rounds": 99}, "above its maximum 20"),
    ("ConceptEditCrossAttentionEdit", {"concepts": "cat", "mode": "debias", "guide": "a:1, b:1",
                                       "official": "uce_sd_erase"}, "does not debias"),
    ("ConceptEditUCEDebias", {"options": "male:0.5, female:x"}, "must be a number"),
    ("ConceptEditUCEDebias", {"concepts": ""}, "concept list is empty"),
    ("ConceptEditTextEncoderEdit", {"concepts": "cat dog"}, "write 'source -> destination'"),
    ("ConceptEditTextEncoderEdit", {"concepts": "# only a comment"}, "no concepts given"),
    ("ConceptEditTextEncoderEdit", {"concepts": "cat -> cat"}, "mapped to itself"),
    ("ConceptEditTextEncoderEdit", {"templates": "a photo"}, "'{}'"),
    ("ConceptEditConceptPrune", {"concepts": ""}, "name at least one concept"),
    ("ConceptEditConceptPrune", {"pairs": "a {concept} | a | b"}, "one '|'"),
    ("ConceptEditConceptPrune", {"tau": 60, "steps": 50}, "between 1 and steps=50"),
    ("ConceptEditConceptPrune", {"preset": "custom"}, "no prompt pairs"),
    ("ConceptEditTrainUnlearn", {"official": "esd", "method": "rgd"}, "set method to esd"),
    ("ConceptEditTrainUnlearn", {"concept": " "}, "name the concept"),
    ("ConceptEditResurgenceAudit", {"steps": "ten"}, "numbers separated by commas"),
    ("ConceptEditResurgenceAudit", {"concept_prompts": "# none"}, "concept_prompts is empty"),
    ("ConceptEditRedTeamAudit", {"prefix": False, "embedding_match": False, "inversion": False, "revival": False},
     "choose at least one attack"),
    ("ConceptEditExportLoRA", {"dense_as": "zip"}, "not one of the choices"),
    ("ConceptEditConceptPresence", {"prompts": "\n# no prompt"}, "at least one prompt"),
]


@pytest.mark.parametrize("node_id,changed,words", BAD, ids=[f"{b[0][11:]}-{'-'.join(b[1])}" for b in BAD])
def test_validate_inputs_says_what_is_wrong(node_id, changed, words):
    cls = _nodes().NODE_CLASS_MAPPINGS[node_id]
    msg = cls.validate_inputs(**{**_defaults(cls), **VALID.get(node_id, {}), **changed})
    assert isinstance(msg, str) and words in msg, msg


def test_validate_inputs_skips_linked_values():
    """A widget turned into a linked input is None at validation (known only when it runs)."""
    cls = _nodes().NODE_CLASS_MAPPINGS["ConceptEditConceptPrune"]
    assert cls.validate_inputs(**{**_defaults(cls), "concepts": None, "tau": None}) is True
    assert "not one of" in cls.validate_inputs(**{**_defaults(cls), "concepts": None, "preset": "artistt"})


def _validate_in_comfyui(node_id: str, inputs: dict) -> list[dict]:
    """The errors ComfyUI's own execution.validate_inputs gives node "1" of a prompt whose MODEL,
    CLIP and EDIT come from linked nodes ("2": a checkpoint loader, "3": Load Edit)."""
    import execution
    prompt = {"1": {"class_type": node_id, "inputs": inputs},
              "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "none.safetensors"}},
              "3": {"class_type": "ConceptEditLoadEdit", "inputs": {"edit_name": "none.safetensors"}}}
    _ok, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "1", {}))
    return errors


def test_comfyui_runs_the_checks_before_the_graph(comfy):
    links = {"model": ["2", 0], "clip": ["2", 1]}
    widgets = {"concepts": "cat\n-> dog", "mode": "erase", "guide": "", "preserve": "", "default_preserve": True,
               "lam": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1, "token_window": "auto"}
    errors = _validate_in_comfyui("ConceptEditCrossAttentionEdit", {**links, **widgets})
    assert any(e["type"] == "custom_validation_failed" and "no concept before '->'" in e["details"] for e in errors)
    assert not _validate_in_comfyui("ConceptEditCrossAttentionEdit", {**links, **widgets, "concepts": "cat -> dog"})
    # a widget fed by a link (Load Edit's info text) is left to the run
    assert not _validate_in_comfyui("ConceptEditCrossAttentionEdit", {**links, **widgets, "concepts": ["3", 1]})
    # a range the check names is still enforced; one it does not name stays ComfyUI's
    errors = _validate_in_comfyui("ConceptEditCrossAttentionEdit", {**links, **widgets, "concepts": "cat",
                                                                     "lam": 5000.0})
    assert any("above its maximum" in e["details"] for e in errors), errors
    errors = _validate_in_comfyui("ConceptEditExportLoRA", {"edit": ["3", 0], "filename": "x", "rank": 0,
                                                            "max_rel_error": 0.01, "dense_as": "zip"})
    assert any("not one of the choices" in e["details"] for e in errors), errors


# ---- an older ComfyUI ---------------------------------------------------------------------------
def test_a_comfyui_without_the_v3_api_gets_one_clear_message_and_no_nodes(tmp_path):
    """ComfyUI's own loader on a host whose comfy_api.latest cannot be imported (as before 0.3.48)."""
    link = tmp_path / "ComfyUI-ConceptEdit"
    os.symlink(ROOT, link)
    code = f"""
import asyncio, importlib.abc, inspect, logging, sys
sys.path.insert(0, {ROOT!r})
import _pack
from _pack import load
boot = load("_boot")
from _boot.comfy_host.locate import ensure_comfy
ensure_comfy(cpu=True)
import nodes
for name in [n for n in sys.modules if n.startswith("comfy_api.latest")]:
    del sys.modules[name]
import comfy_api
del comfy_api.latest
class Old(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("comfy_api.latest"):
            raise ImportError("No module named " + repr(name))
sys.meta_path.insert(0, Old())
logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
print("LOAD START")
res = nodes.load_custom_node({str(link)!r})
res = asyncio.run(res) if inspect.iscoroutine(res) else res
print("RESULT", res, sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("ConceptEdit")))
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.split("LOAD START", 1)[1]
    assert "RESULT True []" in out, out[-3000:]
    assert out.count("ConceptEdit needs ComfyUI >= 0.3.75; update ComfyUI") == 1, out[-3000:]
    assert "Traceback" not in out and "Skip" not in out, out[-3000:]
