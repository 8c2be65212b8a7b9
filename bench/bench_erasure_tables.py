"""The erasure benchmark's tables for every method on the tiny model, written into docs/benchmarks.md.

    bash run.sh bench bench_erasure_tables [--prompts 4] [--samples 2] [--steps 20] [--write]

Each method makes its edit on the bundled tiny model with its tiny settings (those the red-team
bench uses), then `comfy_host.benchmark.benchmark_models` (the code behind the Erasure Benchmark node
and `conceptedit evaluate`) judges the original and the edited model with the tiny classifier and
the presence score over every concept of the erased concept's kind (the erased one and the kept
ones), `--prompts` prompts × `--samples` pictures each, the same seeds before and after. The
original's pictures are cached once and shared by every edit. `--write` replaces the section
between the marker comments in docs/benchmarks.md.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: I001

import argparse
import logging
import platform
import tempfile
import time

import torch
from conceptedit.comfy_host.locate import ensure_comfy

ensure_comfy(cpu=True)

from conceptedit.comfy_host.benchmark import benchmark_models
from conceptedit.comfy_host.jobs import ConceptPruneJob, EmcidJob, UCEJob, UnlearnJob, run
from conceptedit.editing.benchmark.cache import ResultCache, edit_fingerprint
from conceptedit.editing.benchmark.prompts import PromptCase
from conceptedit.editing.benchmark.runner import Settings
from conceptedit.editing.concept_prune.config import PruneConfig
from conceptedit.editing.emcid.config import EmcidConfig
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.prompts import TINY_DEFAULTS
from conceptedit.editing.uce.config import UCEConfig
from conceptedit.editing.unlearn.config import UnlearnConfig
from conceptedit.tiny import world
from conceptedit.tiny.comfy_model import load_tiny

log = logging.getLogger("bench_erasure_tables")
METHODS = ("uce_red", "prune_triangle", "emcid_red", "rgd_red", "esd_red")
START, END = "<!-- erasure-benchmark-tables:start -->", "<!-- erasure-benchmark-tables:end -->"
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


def make_edit(model, clip, name, unlearn_steps):
    """(concept, result) of each method's tiny-model edit, through the jobs the nodes run."""
    method, concept = name.split("_", 1)
    ctx = RunContext()
    if method == "uce":
        return concept, "UCE, erase to \"\", last-token window", run("uce", 
            model, clip, UCEJob(settings=UCEConfig(concepts=[concept], mode="erase", guide="", token_window="last")), ctx)
    if method == "prune":
        return concept, f"ConceptPrune, tiny preset {TINY_DEFAULTS}", run("concept_prune", 
            model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=PruneConfig(**TINY_DEFAULTS)), ctx)
    if method == "emcid":
        cfg = EmcidConfig(lam=1000, use_stage1=False, templates=world.EMCID_TEMPLATES["colour"], n_captions=1000)
        return concept, "EMCID red → purple, λ 1000, no stage 1", run("emcid", 
            model, clip, EmcidJob(pairs=[(concept, "purple")], settings=cfg,
                                  cache_dir=os.path.join(ROOT, ".cache", "emcid")), ctx)
    extra = {"esd_xt": "noised", "esd_prompt": "templates"} if method == "esd" else {}
    cfg = UnlearnConfig(method=method, steps=unlearn_steps, lr=1e-3, batch=4, n_prompts=6, gen_steps=8, rank=4, **extra)
    return concept, f"{method.upper()} LoRA rank 4, {unlearn_steps} steps, lr 1e-3", run("unlearn", 
        model, clip, UnlearnJob(concept=concept, settings=cfg), ctx)


def cases_for(concept, n_prompts):
    kind = world.kind_of(concept)
    out = []
    for c in world.CONCEPTS[kind]:
        if not world.words(c):
            continue
        for i, (p, _) in enumerate(world.prompts_for(c, n_prompts, seed=11)):
            out.append(PromptCase(p, seed=1000 + 97 * len(out), guidance=5.0, label=c, set=f"tiny {kind}s"))
    return out


def pct(v):
    return "–" if v is None else f"{100 * v:.0f} %"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--unlearn-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="", help="result cache folder (default: a fresh temporary one)")
    ap.add_argument("--write", action="store_true", help="replace the tables in docs/benchmarks.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, clip, _ = load_tiny()
    cache = ResultCache(args.cache or tempfile.mkdtemp(prefix="erasure-tables-"))
    settings = Settings(samples=args.samples, steps=args.steps, cfg=5.0, batch=16)
    summary, details = [], []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            t0 = time.perf_counter()
            concept, how, res = make_edit(model, clip, name, args.unlearn_steps)
            t_edit = time.perf_counter() - t0
            cases = cases_for(concept, args.prompts)
            t0 = time.perf_counter()
            rep = benchmark_models(model, clip, res.model, res.clip, cases, settings, "classifier,presence",
                                   edit_key=edit_fingerprint(res.edit), erased=[concept], cache=cache, ctx=RunContext(),
                                   judge_options={"presence": {"concepts": [concept]}})
            t_bench = time.perf_counter() - t0
            acc = {r["class"]: r for r in rep.rows if r["judge"] == "classifier" and r["metric"] == "concept accuracy"}
            spec = next(r for r in rep.rows if r["judge"] == "classifier" and r["metric"] == "specificity")
            pres = next(r for r in rep.rows if r["judge"] == "presence" and r["metric"] == "mean score"
                        and r["class"] == concept)
            e = acc[concept]
            summary.append(f"| {res.edit.method} ({how}) | {concept} | {pct(e['original'])} → {pct(e['edited'])} | "
                           f"{pct(spec['original'])} → {pct(spec['edited'])} | {pres['original']:.3f} → "
                           f"{pres['edited']:.3f} | {e['n']} / {spec['n']} | {t_edit:.1f} s | {t_bench:.0f} s |")
            details.append(f"**{res.edit.method}, {concept}** ({how}):\n\n" + rep.table_markdown())
            print(summary[-1], flush=True)
    seconds = time.perf_counter() - t_all

    cmd = (f"bash run.sh bench bench_erasure_tables --prompts {args.prompts} --samples {args.samples} --steps "
           f"{args.steps} --unlearn-steps {args.unlearn_steps} --write")
    text = "\n".join([
        START,
        (f"Produced by `{cmd}` ({seconds / 60:.1f} min on a {os.cpu_count()}-core CPU, no GPU; "
        f"{platform.machine()}, torch {torch.__version__}). Per edit: every concept of the erased one's kind, "
        f"{args.prompts} prompts × {args.samples} samples each ({args.prompts * args.samples} pictures per class and "
        f"model, so one picture is {100 / (args.prompts * args.samples):.1f} points of a class's accuracy), "
        f"{args.steps} euler steps, CFG 5, the same seeds for the original and the edited model; judges: the tiny "
        "classifier (concept accuracy = the share of a class's pictures it reads as that class; specificity = the "
        "same over the kept classes) and presence (the edited model's own denoising gain for the prompt minus its "
        "concept-free twin, on the original's pictures, 4 timesteps)."),
        "",
        ("| method (tiny settings) | erased | concept accuracy, erased class | specificity (kept classes) | "
        "presence, erased class | pictures (erased / kept) | edit time | benchmark time |"),
        "|---|---|---|---|---|---|---|---|",
        *summary, "", "The full tables (`classifier` and `presence` rows, as the node and the command write them):",
        "", *details, END])
    print(text)
    if args.write:
        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
        if START in doc and END in doc:
            doc = doc[:doc.index(START)] + text + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n## Erasure benchmark on the tiny model\n\n" + text + "\n"
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(doc)
        print(f"wrote {DOC}")



if __name__ == "__main__":
    main()
