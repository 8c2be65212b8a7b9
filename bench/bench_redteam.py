"""Red-team audit of every method's edit on the tiny model, and UCE with RECE hardening, in one run.

    bash run.sh bench bench_redteam [--methods uce_red,uce_circle,prune_triangle,emcid_red,rgd_red,esd_red]
                                    [--steps 40] [--samples 8] [--harden 0,1,2,3] [--unlearn-steps 200]

Per edit: the classifier's presence of the concept in the original model's pictures of its prompts,
in the edited model's, and in the edited model's pictures under each attack (soft prompt; and its
projection to real words), at the stated budget (steps of Adam on the soft tokens), with the time
each attack took; for ConceptPrune also the weight revival. Then UCE on red with 0..3 hardening
rounds: presence under the prefix attack against the classifier's accuracy on the other colours.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy()

from conceptedit.comfy_host.view import apply_edit  # noqa: E402
from conceptedit.comfy_host.audits import red_team_models  # noqa: E402
from conceptedit.comfy_host.jobs import ConceptPruneJob, EmcidJob, UCEJob, run  # noqa: E402
from conceptedit.comfy_host.view import ModelView  # noqa: E402
from conceptedit.editing.concept_prune.config import PruneConfig  # noqa: E402
from conceptedit.editing.emcid.config import EmcidConfig  # noqa: E402
from conceptedit.editing.prompts import TINY_DEFAULTS  # noqa: E402
from conceptedit.editing.redteam.runner import ATTACKS, RedTeamConfig  # noqa: E402
from conceptedit.editing.redteam.soft import AttackConfig  # noqa: E402
from conceptedit.editing.uce.config import UCEConfig  # noqa: E402
from conceptedit.editing.unlearn.config import UnlearnConfig  # noqa: E402
from conceptedit.editing.unlearn.trainer import compute_unlearn  # noqa: E402
from conceptedit.tiny import world  # noqa: E402
from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny  # noqa: E402
from conceptedit.editing.audit.evaluate import erasure_report  # noqa: E402

log = logging.getLogger("bench_redteam")
METHODS = ("uce_red", "uce_circle", "prune_triangle", "emcid_red", "rgd_red", "esd_red")


def make_edit(model, clip, name, args):
    """Each method's best tiny-model edit, with the settings docs/benchmarks.md reports for it."""
    method, concept = name.split("_", 1)
    if method == "uce":
        return concept, run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=[concept], token_window="last"))).edit
    if method == "prune":
        return concept, run("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny",
                                                                          settings=PruneConfig(**TINY_DEFAULTS))).edit
    if method == "emcid":
        cfg = EmcidConfig(lam=1000, use_stage1=False, templates=world.EMCID_TEMPLATES["colour"], n_captions=1000)
        return concept, run("emcid", model, clip, EmcidJob(pairs=[(concept, "purple")], settings=cfg,
                                                           cache_dir=os.path.join(ROOT, ".cache", "emcid"))).edit
    host = ModelView(model, clip).denoiser
    extra = {"esd_xt": "noised", "esd_prompt": "templates"} if method == "esd" else {}  # the form that erases here
    cfg = UnlearnConfig(method=method, steps=args.unlearn_steps, lr=1e-3, batch=4, n_prompts=6, gen_steps=8, rank=4,
                        **extra)
    with torch.inference_mode(False), torch.enable_grad():
        return concept, compute_unlearn(host, host.text, concept, cfg, family="tiny")


def attack(model, clip, concept, edit, args, attacks=ATTACKS):
    edited, edited_clip, _ = apply_edit(model, clip, edit)
    prompts = [p for p, _ in world.prompts_for(concept, 4)]
    cfg = RedTeamConfig(attacks=tuple(attacks), attack=AttackConfig(
        steps=args.steps, samples=args.samples, images=args.samples, sample_steps=args.sample_steps, cfg=5.0,
        lr=args.lr))
    rep = red_team_models(edited, model, clip, prompts, cfg, edit=edit, edited_clip=edited_clip, concept=concept)
    log.info("%s", rep.to_text())
    return rep


def kept(model, clip, edit, concept, args):
    """The classifier's accuracy on three other concepts of the same kind (what the edit must keep)."""
    others = [c for c in world.CONCEPTS[world.kind_of(concept)] if c != concept and world.words(c)][:3]
    m, c, _ = apply_edit(model, clip, edit)
    r = erasure_report(comfy_sampler(m, c, steps=args.sample_steps), [concept], others, n_prompts=4,
                       samples_per_prompt=2)
    return sum(r["specificity"].values()) / len(others)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--harden", default="0,1,2,3")
    ap.add_argument("--unlearn-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, clip, _ = load_tiny()
    out = {"args": vars(args), "edits": {}, "hardening": {}}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            concept, edit = make_edit(model, clip, name, args)
            rep = attack(model, clip, concept, edit, args)
            out["edits"][name] = rep.to_dict()
        for rounds in [int(r) for r in args.harden.split(",") if r.strip()]:
            edit = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], token_window="last",
                                                                     harden_rounds=rounds))).edit
            rep = attack(model, clip, "red", edit, args, attacks=("prefix",))
            out["hardening"][rounds] = {**rep.to_dict(), "other_colours": kept(model, clip, edit, "red", args),
                                        "preserve_rel_change_mean": edit.metrics["preserve_rel_change_mean"]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print_tables(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def print_tables(out):
    pct = lambda v: "n/a" if v != v else f"{100 * v:.0f} %"  # noqa: E731
    print("| edit | original → edited | " + " | ".join(f"{a} (soft / words)" for a in ATTACKS) + " | holds? |")
    print("|---|---|" + "---|" * len(ATTACKS) + "---|")
    for name, d in out["edits"].items():
        j = d["judges"][0]
        cells = []
        for a in ATTACKS:
            r = d["attacks"].get(a)
            cells.append("–" if r is None else f"{pct(r['soft'][j])} / {pct(r['projected'][j])} ({r['seconds']:.0f} s)")
        broken = [a if r["success"] else f"{a} (words)" for a, r in d["attacks"].items() if r["succeeded"]]
        print(f"| {name} | {pct(d['original'][j])} → {pct(d['edited'][j])} | " + " | ".join(cells)
              + f" | {'no: ' + ', '.join(broken) if broken else 'yes'} |")
        if "revival" in d:
            rv = d["revival"]
            print(f"|   revival of {rv['pruned_weights']} pruned weights | "
                  + ", ".join(f"{100 * f:g} % → {pct(p[j])}" for f, p in zip(rv["fractions"], rv["presence"])) + " |")
    print()
    print("| UCE red, hardening rounds | edited | under the prefix attack | other colours kept | preserve K/V change |")
    print("|---|---|---|---|---|")
    for rounds, d in out["hardening"].items():
        j = d["judges"][0]
        print(f"| {rounds} | {pct(d['edited'][j])} | {pct(d['attacks']['prefix']['soft'][j])} | "
              f"{pct(d['other_colours'])} | {100 * d['preserve_rel_change_mean']:.2f} % |")


if __name__ == "__main__":
    main()
