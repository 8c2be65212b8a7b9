"""Pictures-based size of the default-vs-official difference of EMCID on the bundled tiny model.

    OMP_NUM_THREADS=1 bash run.sh bench official_emcid_pictures

red -> the last colour (as bench/bench_emcid.py --part tiny, case "one", colour templates), with the
pack's default and with official="emcid" (each its own stage 1, seed 0 and 1); the tiny classifier
reads 6 prompts x 2 pictures per concept: efficacy = share of red prompts' pictures still red (lower =
redirected), specificity = accuracy on the other colours' prompts (higher = kept).
C0 and stage-1 targets are cached in /tmp/emcid_measure_cache.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _pack  # noqa: E402

_pack.load()
from conceptedit.comfy_host.jobs import EmcidJob, run  # noqa: E402
from conceptedit.editing.audit.evaluate import erasure_report  # noqa: E402
from conceptedit.editing.emcid.config import EmcidConfig
from conceptedit.tiny import world  # noqa: E402
from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny  # noqa: E402

model, clip, _ = load_tiny()
colours = list(world.COLOURS)
erased, kept = [colours[0]], colours[1:-1]
templates = world.EMCID_TEMPLATES["colour"]


def mean(d):
    return round(sum(d.values()) / len(d), 3)


def report(c):
    r = erasure_report(comfy_sampler(model, c), erased, kept, n_prompts=6, samples_per_prompt=2)
    return {"efficacy": mean(r["efficacy"]), "specificity": mean(r["specificity"])}


out = {"pair": f"{colours[0]} -> {colours[-1]}", "original": report(clip)}
for name, official in (("default", "off"), ("official", "emcid")):
    for seed in (0, 1):
        cfg = EmcidConfig(official=official, templates=templates, seed=seed)
        _, clip2, edit, warnings = run("emcid", model, clip, EmcidJob(pairs=[(colours[0], colours[-1])], settings=cfg,
                                                                     cache_dir="/tmp/emcid_measure_cache"))
        st2 = edit.metrics["stage2"]["clip_l"]
        out[f"{name} seed {seed}"] = {**report(clip2), "lam": st2["lam"], "reach_per_layer":
                                      [round(x, 3) for x in st2["reach_per_layer"]], "warnings": warnings}
        print(name, seed, out[f"{name} seed {seed}"], flush=True)
print(json.dumps(out, indent=1))
