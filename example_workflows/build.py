"""Regenerate the example workflows (ComfyUI UI format) from short graph descriptions.

    bash run.sh py example_workflows/build.py

Node inputs, outputs and the order of widget values are read off the registered node
definitions, so a workflow always matches the current nodes; tests/test_workflows.py validates the
written files independently. A feature whose nodes are not registered yet is skipped with a note.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}
CKPT = "v1-5-pruned-emaonly.safetensors"
FLUX_CKPT = "flux1-schnell-fp8.safetensors"


def is_widget(spec) -> bool:
    # a choice list: V1 gives the options as the type, V3 ("COMBO") in the spec's "options"
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES or spec[0] == "COMBO"


def choices(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else list((spec[1] if len(spec) > 1 else {}).get("options", []))


class Workflow:
    def __init__(self, defs: dict):
        self.defs = defs
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, values: dict | None = None, pos=(0, 0), title: str | None = None) -> dict:
        if type_ not in self.defs:
            raise KeyError(type_)
        cls = self.defs[type_]
        spec = cls.INPUT_TYPES()
        inputs, widgets = [], []
        values = dict(values or {})
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                if is_widget(s):
                    opts = s[1] if len(s) > 1 else {}
                    if name in values:
                        v = values.pop(name)
                    elif "default" in opts:
                        v = opts["default"]
                    elif isinstance(s[0], list) or s[0] == "COMBO":
                        v = choices(s)[0] if choices(s) else ""
                    else:
                        v = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[s[0]]
                    widgets.append(v)
                    if s[0] == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
                        widgets.append("fixed")
                else:
                    inputs.append({"name": name, "type": s[0], "link": None})
        if values:
            raise KeyError(f"{type_} has no widget inputs {sorted(values)}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 120], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        out_i = output if isinstance(output, int) else next(
            i for i, o in enumerate(src["outputs"]) if o["name"] == output or o["type"] == output)
        in_i = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == input_name)
        lid = len(self.links) + 1
        typ = src["outputs"][out_i]["type"]
        self.links.append([lid, src["id"], out_i, dst["id"], in_i, typ])
        src["outputs"][out_i]["links"].append(lid)
        dst["inputs"][in_i]["link"] = lid

    def to_json(self, note: str) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"conceptedit": {"about": note}}, "version": 0.4}


def _base(wf: Workflow, prompt: str, x: int = 0):
    ckpt = wf.add("CheckpointLoaderSimple", {"ckpt_name": CKPT}, pos=(x, 100))
    return ckpt


def _sample(wf: Workflow, model_src, model_out, clip_src, clip_out, vae_src, prompt: str, x: int, y: int,
            title: str, seed: int = 0, sampler: dict | None = None, size: int = 512):
    pos = wf.add("CLIPTextEncode", {"text": prompt}, pos=(x, y), title=f"{title}: prompt")
    neg = wf.add("CLIPTextEncode", {"text": ""}, pos=(x, y + 160), title=f"{title}: negative")
    lat = wf.add("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, pos=(x, y + 320))
    ks = wf.add("KSampler", {"seed": seed, **(sampler or {"steps": 25, "cfg": 7.5})}, pos=(x + 360, y), title=title)
    dec = wf.add("VAEDecode", pos=(x + 720, y))
    out = wf.add("PreviewImage", pos=(x + 960, y), title=title)
    for enc in (pos, neg):
        wf.link(clip_src, clip_out, enc, "clip")
    wf.link(model_src, model_out, ks, "model")
    wf.link(pos, 0, ks, "positive")
    wf.link(neg, 0, ks, "negative")
    wf.link(lat, 0, ks, "latent_image")
    wf.link(ks, 0, dec, "samples")
    wf.link(vae_src, "VAE", dec, "vae")
    wf.link(dec, 0, out, "images")


def _info_and_save(wf, src, out, x, y, filename):
    info = wf.add("ConceptEditEditInfo", pos=(x, y))
    wf.link(src, out, info, "edit")
    save = wf.add("ConceptEditSaveEdit", {"filename": filename}, pos=(x, y + 260))
    wf.link(src, out, save, "edit")


def _presence(wf, ckpt, edited, edited_out, prompts, x, y, clip_src=None, clip_out=None):
    pres = wf.add("ConceptEditConceptPresence", {"prompts": prompts, "steps": 20}, pos=(x, y))
    wf.link(ckpt, "MODEL", pres, "model")
    wf.link(edited, edited_out, pres, "edited_model")
    wf.link(ckpt, "CLIP", pres, "clip")
    wf.link(ckpt, "VAE", pres, "vae")
    if clip_src is not None:
        wf.link(clip_src, clip_out, pres, "edited_clip")
    prev = wf.add("PreviewImage", pos=(x + 360, y), title="presence: original (top) vs edited (bottom)")
    wf.link(pres, "samples", prev, "images")


def erase_concept_prune(wf):
    ck = _base(wf, "")
    cp = wf.add("ConceptEditConceptPrune", {"concepts": "Van Gogh", "preset": "artist"}, pos=(360, 100))
    wf.link(ck, "MODEL", cp, "model")
    wf.link(ck, "CLIP", cp, "clip")
    _sample(wf, cp, "model", ck, "CLIP", ck, "a starry night over a village in the style of Van Gogh", 760, 100,
            "pruned model")
    _info_and_save(wf, cp, "edit", 360, 520, "vangogh_pruned")
    _presence(wf, ck, cp, "model", "a painting in the style of Van Gogh\na portrait in the style of Van Gogh\n"
              "a painting in the style of Claude Monet\na photo of a dog", 760, 620)
    return "ConceptPrune: erase an artist by pruning the feed-forward weights skilled at it (training-free)."


def erase_closed_form(wf):
    ck = _base(wf, "")
    ce = wf.add("ConceptEditCrossAttentionEdit", {"concepts": "Van Gogh\nSalvador Dali", "mode": "erase"},
                pos=(360, 100))
    wf.link(ck, "MODEL", ce, "model")
    wf.link(ck, "CLIP", ce, "clip")
    _sample(wf, ce, "model", ck, "CLIP", ck, "a starry night in the style of Van Gogh", 760, 100, "edited model")
    _info_and_save(wf, ce, "edit", 360, 560, "artists_uce")
    lora = wf.add("ConceptEditExportLoRA", {"filename": "artists_uce_lora"}, pos=(360, 1000))
    wf.link(ce, "edit", lora, "edit")
    return ("Closed-form cross-attention edit (UCE): erase two artists in seconds; save the edit and export it as "
            "a LoRA for Automatic1111/Forge/diffusers.")


def erase_flux_closed_form(wf):
    # ComfyUI's all-in-one Flux.1-schnell checkpoint; with separate files, UNETLoader + DualCLIPLoader
    # (type flux) + VAELoader give the same MODEL/CLIP/VAE. An empty latent gets Flux's 16 channels
    # from the sampler itself.
    ck = wf.add("CheckpointLoaderSimple", {"ckpt_name": FLUX_CKPT}, pos=(0, 100))
    ce = wf.add("ConceptEditCrossAttentionEdit", {"concepts": "Van Gogh\nSalvador Dali", "mode": "erase"},
                pos=(360, 100))
    wf.link(ck, "MODEL", ce, "model")
    wf.link(ck, "CLIP", ce, "clip")
    _sample(wf, ce, "model", ck, "CLIP", ck, "a starry night in the style of Van Gogh", 760, 100, "edited Flux",
            sampler={"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}, size=1024)
    _info_and_save(wf, ce, "edit", 360, 560, "artists_uce_flux")
    lora = wf.add("ConceptEditExportLoRA", {"filename": "artists_uce_flux_lora"}, pos=(360, 1000))
    wf.link(ce, "edit", lora, "edit")
    return ("Closed-form edit on Flux (needs a ComfyUI of 2024-08 or later): erase two artists where the T5 text "
            "enters the model (txt_in), in seconds; save the edit and export it as a LoRA that ComfyUI's LoraLoader "
            "and diffusers' Flux pipeline read.")


def massive_edit_from_list(wf):
    ck = _base(wf, "")
    em = wf.add("ConceptEditTextEncoderEdit", {
        "concepts": "Van Gogh -> a painter\nClaude Monet -> a painter\nSalvador Dali -> a painter\n"
                    "Pablo Picasso -> a painter\nAndy Warhol -> a painter\nRembrandt -> a painter\n"
                    "# one line per concept; hundreds are fine",
        "use_stage1": False}, pos=(360, 100))
    wf.link(ck, "CLIP", em, "clip")
    wf.link(ck, "MODEL", em, "model")
    _sample(wf, ck, "MODEL", em, "clip", ck, "a sunflower field in the style of Van Gogh", 760, 100,
            "edited text encoder")
    _info_and_save(wf, em, "edit", 360, 560, "painters_emcid")
    return ("Massive concept edit (EMCID): rewrite many concepts at once in the text encoder from a list of "
            "'source -> destination' lines.")


def _load_and_apply(wf, ck, edit_name: str):
    """Load Concept Edit -> Apply Concept Edit on the checkpoint's MODEL and CLIP, strength 1."""
    le = wf.add("ConceptEditLoadEdit", {"edit_name": edit_name}, pos=(0, 400))
    ap = wf.add("ConceptEditApplyEdit", {"strength": 1.0}, pos=(360, 100))
    wf.link(ck, "MODEL", ap, "model")
    wf.link(le, "edit", ap, "edit")
    wf.link(ck, "CLIP", ap, "clip")
    return le, ap


def load_shared_edit(wf):
    ck = _base(wf, "")
    le, ap = _load_and_apply(wf, ck, "shared_edit.safetensors")
    _sample(wf, ap, "model", ap, "clip", ck, "a starry night in the style of Van Gogh", 760, 100, "with the edit")
    info = wf.add("ConceptEditEditInfo", pos=(360, 500))
    wf.link(le, "edit", info, "edit")
    return ("Load an edit someone shared (models/concept_edits/*.safetensors), check what it does in the Edit Info "
            "view, and apply it at any strength (the base model must be the family it was made for).")


def _audit_inputs(wf, node, ck, le, ap, vae: bool = False):
    """An audit node's edited model (the applied edit), original model, CLIP (, VAE) and the edit."""
    wf.link(ap, "model", node, "edited_model")
    wf.link(ck, "MODEL", node, "original_model")
    wf.link(ck, "CLIP", node, "clip")
    if vae:
        wf.link(ck, "VAE", node, "vae")
    wf.link(le, "edit", node, "edit")


def audit_resurgence(wf):
    ck = _base(wf, "")
    le, ap = _load_and_apply(wf, ck, "vangogh_pruned.safetensors")
    audit = wf.add("ConceptEditResurgenceAudit", {
        "concept_prompts": "a painting in the style of Van Gogh\na starry night in the style of Van Gogh\n"
                           "sunflowers in the style of Van Gogh"}, pos=(760, 100))
    _audit_inputs(wf, audit, ck, le, ap)
    plot = wf.add("PreviewImage", pos=(1160, 100), title="presence vs benign fine-tuning steps")
    wf.link(audit, "plot", plot, "images")
    red = wf.add("ConceptEditRedTeamAudit", {
        "concept": "Van Gogh",
        "concept_prompts": "a painting in the style of Van Gogh\na starry night in the style of Van Gogh"}, pos=(760, 520))
    _audit_inputs(wf, red, ck, le, ap, vae=True)
    grid = wf.add("PreviewImage", pos=(1160, 520), title="original / edited / each attack")
    wf.link(red, "grid", grid, "images")
    return ("Audit an erasure: fine-tune the edited model briefly on benign prompts and measure how much of the "
            "erased concept comes back (Resurgence Audit), and try to bring it back with adversarial prompts, a "
            "matched soft prompt, a learned new word and restored weights (Red-Team Audit; no classifier needed).")


FEATURES = [erase_concept_prune, erase_closed_form, erase_flux_closed_form, massive_edit_from_list, load_shared_edit,
            audit_resurgence]


def main() -> None:
    sys.path.insert(0, ROOT)
    import _pack
    _pack.load()
    from conceptedit.comfy_host.locate import ensure_comfy
    ensure_comfy(cpu=True)
    import nodes
    from conceptedit.nodes import NODE_CLASS_MAPPINGS as PACK_NODES
    defs = {**nodes.NODE_CLASS_MAPPINGS, **PACK_NODES}
    for feature in FEATURES:
        wf = Workflow(defs)
        try:
            note = feature(wf)
        except KeyError as e:
            print(f"skipped {feature.__name__}: node {e} is not registered yet")
            continue
        path = os.path.join(HERE, feature.__name__ + ".json")
        with open(path, "w") as f:
            json.dump(wf.to_json(note), f, indent=1)
            f.write("\n")
        print(f"wrote {path} ({len(wf.nodes)} nodes, {len(wf.links)} links)")


if __name__ == "__main__":
    main()
