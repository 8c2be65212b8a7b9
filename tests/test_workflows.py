"""Every example workflow (example_workflows/*.json, ComfyUI's UI format) against the node
definitions ComfyUI registered after loading the pack: node types exist, links join matching types,
required sockets are connected, and widget values are valid for each node's INPUT_TYPES."""
import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# combo inputs that list files the user has (empty in a test install): any file name of the right kind is valid
FILE_INPUTS = {"ckpt_name": (".safetensors", ".ckpt"), "edit_name": (".safetensors",),
               "lora_name": (".safetensors",), "vae_name": (".safetensors", ".pt")}
FEATURES = ["erase_concept_prune", "erase_closed_form", "erase_flux_closed_form", "massive_edit_from_list",
            "load_shared_edit"]


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _choices(spec) -> list | None:
    """A dropdown's options: V1 declares them as the type itself, V3 as ("COMBO", {"options": [...]})."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return list((spec[1] if len(spec) > 1 else {}).get("options", []))
    return None


def _check_value(where: str, name: str, spec, value) -> None:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    choices = _choices(spec)
    if choices is not None:
        if value in choices:
            return
        exts = FILE_INPUTS.get(name)
        assert exts and isinstance(value, str) and value.endswith(exts), \
            f"{where}: {name}={value!r} is not one of {choices[:8]}"
        return
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name}={value!r} is not an INT"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name}={value!r} is not a FLOAT"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name}={value!r} is not a STRING"
        return
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name}={value!r} is not a BOOLEAN"
        return
    if "min" in opts:
        assert value >= opts["min"], f"{where}: {name}={value} is below its min {opts['min']}"
    if "max" in opts:
        assert value <= opts["max"], f"{where}: {name}={value} is above its max {opts['max']}"


def validate_workflow(wf: dict, registry: dict, label: str) -> None:
    assert isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list), f"{label}: not a UI workflow"
    nodes = {n["id"]: n for n in wf["nodes"]}
    missing = sorted({n["type"] for n in wf["nodes"] if n["type"] not in registry})
    assert not missing, f"{label}: node types not registered in ComfyUI: {missing}"
    for n in wf["nodes"]:
        where = f"{label} node {n['id']} ({n['type']})"
        cls = registry[n["type"]]
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        sockets = {i["name"]: i for i in n.get("inputs", [])}
        for name, i in sockets.items():
            assert name in declared, f"{where}: input {name!r} is not declared (declared: {sorted(declared)})"
            want = declared[name][0]
            if not i.get("widget"):  # a converted widget keeps its widget kind
                assert not _is_widget(declared[name]), f"{where}: {name!r} is a widget, listed as a socket"
                assert i["type"] == want, f"{where}: input {name!r} has type {i['type']}, declared {want}"
        for name, s in spec.get("required", {}).items():
            if not _is_widget(s):
                assert sockets.get(name, {}).get("link") is not None, f"{where}: required input {name!r} is not connected"
        outs = list(cls.RETURN_TYPES)
        assert [o["type"] for o in n.get("outputs", [])] == outs, f"{where}: outputs {n.get('outputs')} != {outs}"
        # widget values in declaration order (seed inputs carry their 'control after generate' value too)
        values = list(n.get("widgets_values", []))
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                if not _is_widget(s) or sockets.get(name, {}).get("widget"):
                    if sockets.get(name, {}).get("widget") and values:
                        values.pop(0)  # a converted widget still stores its value
                    continue
                if not values and section == "optional":
                    break
                assert values, f"{where}: no value for widget {name!r}"
                _check_value(where, name, s, values.pop(0))
                opts = s[1] if len(s) > 1 else {}
                if s[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    assert values and values.pop(0) in CONTROL_VALUES, f"{where}: {name!r} needs its control value"
        assert not values, f"{where}: {len(values)} widget values left over: {values}"
    seen = set()
    for link in wf["links"]:
        lid, src, s_slot, dst, d_slot, typ = link[:6]
        assert lid not in seen, f"{label}: link id {lid} used twice"
        seen.add(lid)
        assert src in nodes and dst in nodes, f"{label}: link {lid} joins unknown nodes"
        out_type = registry[nodes[src]["type"]].RETURN_TYPES[s_slot]
        inp = nodes[dst]["inputs"][d_slot]
        spec = registry[nodes[dst]["type"]].INPUT_TYPES()
        in_type = {**spec.get("required", {}), **spec.get("optional", {})}[inp["name"]][0]
        assert out_type == typ == in_type or in_type == "*", \
            f"{label}: link {lid} carries {out_type} ({typ}) into {nodes[dst]['type']}.{inp['name']} ({in_type})"
        assert inp["link"] == lid, f"{label}: node {dst} input {inp['name']} does not point back at link {lid}"
        assert lid in nodes[src]["outputs"][s_slot]["links"], f"{label}: node {src} output does not list link {lid}"
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            assert i.get("link") is None or i["link"] in seen, f"{label}: node {n['id']} points at a missing link"


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_example_workflow_matches_the_registered_nodes(comfy, path):
    with open(path) as f:
        wf = json.load(f)
    validate_workflow(wf, comfy.NODE_CLASS_MAPPINGS, os.path.basename(path))
    assert wf.get("extra", {}).get("conceptedit", {}).get("about"), "say what the workflow shows"


def test_every_feature_has_a_workflow(comfy):
    names = {os.path.splitext(os.path.basename(p))[0] for p in FILES}
    expected = list(FEATURES)
    if any(k.startswith("ConceptEdit") and "esurgence" in k for k in comfy.NODE_CLASS_MAPPINGS):
        expected.append("audit_resurgence")  # once the audit node exists: bash run.sh py example_workflows/build.py
    assert not set(expected) - names, f"missing example workflows: {sorted(set(expected) - names)}"


def test_the_validator_catches_broken_workflows(comfy):
    with open(os.path.join(ROOT, "example_workflows", "load_shared_edit.json")) as f:
        good = json.load(f)
    validate_workflow(good, comfy.NODE_CLASS_MAPPINGS, "good")

    def broken(mutate):
        wf = json.loads(json.dumps(good))
        mutate(wf)
        return wf

    def node(wf, t):
        return next(n for n in wf["nodes"] if n["type"] == t)

    cases = {
        "not registered": lambda wf: node(wf, "ConceptEditEditInfo").update(type="ConceptEditNoSuchNode"),
        "carries": lambda wf: wf["links"][0].__setitem__(5, "LATENT"),
        "is above its max": lambda wf: node(wf, "ConceptEditApplyEdit")["widgets_values"].__setitem__(0, 99.0),
        "is not one of": lambda wf: node(wf, "KSampler")["widgets_values"].__setitem__(4, "no_such_sampler"),
        "left over": lambda wf: node(wf, "EmptyLatentImage")["widgets_values"].append(3),
        "is not connected": lambda wf: node(wf, "KSampler")["inputs"][0].update(link=None),
    }
    for message, mutate in cases.items():
        with pytest.raises(AssertionError, match=message):
            validate_workflow(broken(mutate), comfy.NODE_CLASS_MAPPINGS, message)
