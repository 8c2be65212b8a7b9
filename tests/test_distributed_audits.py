"""`conceptedit redteam | audit | evaluate` under torchrun (`editing.distributed`), on the shipped tiny
model, two gloo processes on 127.0.0.1, against the same commands in one process:

- the new primitives (`all_gather_bytes`, `gather_json`, `share_held`) over two real processes;
- redteam: the attacks and the revival fractions of a pruning mask are split; the JSON report (but
  the attacks' wall-clock seconds) and the picture grid are the one process's;
- audit: the presence readings' timesteps are split and the benign fine-tune is data parallel (each
  process a share of every batch's rows, the gradients summed); the presence before the fine-tune is
  the one process's number for number, the fine-tune's losses and the presence after it within
  float rounding (below);
- evaluate: the chunks of pictures and the (concept, attack) pairs are split; the CSV table and the
  worst cases' grid are the one process's;
- a restart with another world size and caches that are not shared (rank 1 holds what a one-process
  run left, rank 0 nothing) computes only what no cache holds, and rank 0's cache ends up whole;
- only rank 0 writes the reports (each rank is given its own output folder: rank 1's stays absent).

Tolerance: none, but for the audit's fine-tune. Both sides run one torch thread per process (the torchrun workers through
OMP_NUM_THREADS=1, the one-process runs through torch.set_num_threads(1)), every unit is computed by
one process as one process computes it (a chunk of pictures is batched as one process batches it),
and the results travel as JSON or float64 rows, which carry floats exactly: the files are compared
for equality (measured: equal). The audit's fine-tune sums two half-batch float32 gradients in float64
where one process takes one float32 gradient, as `conceptedit unlearn` does (tests/test_distributed.py):
its losses agree to 1e-5 and the presence after it to TOL_AUDIT (measured: the losses equal at 6 digits,
the presence after 1.2e-7 and the resurgence 7.6e-7 apart).

This file is also the torchrun worker (`python tests/test_distributed_audits.py --worker OUT`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS_CSV = ("prompt,evaluation_seed,evaluation_guidance,class\n"
               "a red circle,11,5.0,red\n"
               "a red square,12,5.0,red\n"
               "a blue circle,13,5.0,blue\n")
CONCEPT_PROMPTS = ["a red circle", "a red square"]
TOL_AUDIT = 1e-4  # the presence after the data-parallel fine-tune (measured: see the module's text)


def redteam_args(out: str, edit: str) -> list[str]:
    return ["redteam", "--ckpt", "tiny", "--cpu", "--edit", edit, "--concept", "red",
            *[a for p in CONCEPT_PROMPTS for a in ("--prompt", p)], "--attacks", "prefix,inversion", "--steps", "3",
            "--samples", "2", "--sample-steps", "4", "--json", os.path.join(out, "redteam.json"),
            "--grid", os.path.join(out, "redteam.png")]


def audit_args(out: str, edit: str) -> list[str]:
    return ["audit", "--ckpt", "tiny", "--cpu", "--edit", edit, "--concept", "red",
            *[a for p in CONCEPT_PROMPTS for a in ("--prompt", p)], "--benign", "a blue square", "--benign",
            "a green circle", "--steps", "2,4", "--json", os.path.join(out, "audit.json")]


def evaluate_args(out: str, edit: str, prompts: str, cache: str, *extra: str) -> list[str]:
    return ["evaluate", "--ckpt", "tiny", "--cpu", "--edit", edit, "--prompts", prompts, "--concept", "red",
            "--judge", "classifier,presence", "--samples", "2", "--steps", "4", "--batch", "2",
            "--attack", "prefix,inversion", "--attack-steps", "2", "--attack-prompts", "1", "--worst", "2",
            "--cache", cache, "--out", os.path.join(out, "report.md"), *extra]


def _worker(out: str) -> int:
    """One torchrun process: the real CLI for each command; each rank writes under its own folder
    (rank 1's must stay empty) and shares the cold run's cache folder; the restart reads a cache of
    its own rank (`cache-r<rank>`), as on machines that share no folder."""
    sys.path.insert(0, ROOT)
    import _pack
    _pack.load()
    import torch

    from conceptedit.cli import main
    from conceptedit.editing import distributed
    rank = int(os.environ["RANK"])
    mine = os.path.join(out, f"r{rank}")
    edit, prompts = os.path.join(out, "edit.safetensors"), os.path.join(out, "prompts.csv")
    runs = [redteam_args(os.path.join(mine, "redteam"), edit), audit_args(os.path.join(mine, "audit"), edit),
            evaluate_args(os.path.join(mine, "cold"), edit, prompts, os.path.join(out, "cache-cold")),
            evaluate_args(os.path.join(mine, "restart"), edit, prompts, os.path.join(out, f"cache-r{rank}"))]
    codes = []
    for args in runs:
        with torch.inference_mode(False):
            codes.append(main(args))
    d = distributed.world() if distributed.active() else 1
    print(f"worker {rank} of {d}: exit codes {codes}\n", end="", flush=True)  # one write: the ranks share the pipe
    return max(codes)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.exit(_worker(sys.argv[sys.argv.index("--worker") + 1]))


import pytest  # noqa: E402
import torch  # noqa: E402

TINY = os.path.join(ROOT, "tiny", "weights", "tiny_sd.safetensors")
needs_tiny = pytest.mark.skipif(not os.path.isfile(TINY), reason="tiny model weights not trained yet")


def _torchrun(out: str, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, ROOT=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, timeout=timeout)


def _main(args: list[str]) -> int:
    from conceptedit.cli import main
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker runs
    try:
        with torch.inference_mode(False):
            return main(args)
    finally:
        torch.set_num_threads(n)


def _json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _without(d, *keys):
    """`d` without the given keys at any depth (wall-clock seconds differ from run to run)."""
    if isinstance(d, dict):
        return {k: _without(v, *keys) for k, v in d.items() if k not in keys}
    if isinstance(d, list):
        return [_without(v, *keys) for v in d]
    return d


def _pixels(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())


def _stats_line(md: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("- pictures generated"))


def _counts(md: str) -> dict[str, int]:
    """The counts in a report's line 'pictures generated G, read from the cache P; judge results
    computed J, cached C; ...'."""
    import re
    m = re.search(r"pictures generated (\d+), read from the cache (\d+); judge results computed (\d+), cached (\d+)",
                  _stats_line(md))
    return dict(zip(("generated", "pictures_cached", "judged", "judged_cached"), map(int, m.groups())))


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- the primitives --------------------------------------------------------------------------------
_PRIMITIVES = r"""
import os, sys, torch
sys.path.insert(0, os.environ["ROOT"])
import _pack
_pack.load()
from conceptedit.editing import distributed as D
assert D.init_from_env(cpu=True) and D.world() == 2
r = D.rank()
assert D.all_gather_bytes(b"" if r == 0 else "é1".encode()) == [b"", "é1".encode()]
got = D.gather_json({i: {"v": i + 0.1, "nan": float("nan")} for i in D.shard_indices(5)})
assert sorted(got) == list(range(5)) and all(got[i]["v"] == i + 0.1 and got[i]["nan"] != got[i]["nan"] for i in got)
assert D.first_holders(4, [1, 2] if r == 0 else [2, 3]) == [None, 0, 0, 1]
shared = D.share_held(4, {1: "r0-1", 2: "r0-2"} if r == 0 else {2: "r1-2", 3: "r1-3"})
assert shared == {1: "r0-1", 2: "r0-2", 3: "r1-3"}, shared
D.shutdown()
print(f"ok {r}\n", end="", flush=True)
"""


def test_sharing_primitives_over_two_gloo_processes(tmp_path):
    from conceptedit.editing import distributed as D
    assert D.all_gather_bytes(b"x") == [b"x"] and D.gather_json({2: [1]}) == {2: [1]}
    assert D.first_holders(3, [1]) == [None, 0, None] and D.share_held(3, {1: "a"}) == {1: "a"}
    script = tmp_path / "prim.py"
    script.write_text(_PRIMITIVES)
    r = _torchrun(str(tmp_path), str(script), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok 0" in r.stdout and "ok 1" in r.stdout


# ---- the three commands, two processes against one ---------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, comfy):
    """A ConceptPrune mask of "red" (so the red team also measures revival), the one-process runs of
    the three commands, a one-process evaluate of the first prompt only (its cache then stands for
    rank 1's, on a machine of its own), then one torchrun job of two processes running them all."""
    if not os.path.isfile(TINY):
        pytest.skip("tiny model weights not trained yet")
    out = tmp_path_factory.mktemp("dist-audits")
    one = out / "one"
    edit, prompts = str(out / "edit.safetensors"), str(out / "prompts.csv")
    (out / "prompts.csv").write_text(PROMPTS_CSV)
    for side in ("one", "r0"):  # the commands write into existing folders; rank 1 gets none (it writes nothing)
        for cmd in ("redteam", "audit"):
            (out / side / cmd).mkdir(parents=True)
    assert _main(["prune", "--ckpt", "tiny", "--cpu", "--concept", "red", "--steps", "2", "--tau", "2",
                  "--skill-ratio", "0.05", "--batch-size", "2", "--cache-dir", "", "--out", edit]) == 0
    assert _main(redteam_args(str(one / "redteam"), edit)) == 0
    assert _main(audit_args(str(one / "audit"), edit)) == 0
    assert _main(evaluate_args(str(one / "cold"), edit, prompts, str(one / "cache"))) == 0
    assert _main(evaluate_args(str(one / "part"), edit, prompts, str(out / "cache-r1"), "--limit", "1")) == 0
    r = _torchrun(str(out), os.path.abspath(__file__), "--worker", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "worker 0 of 2: exit codes [0, 0, 0, 0]" in r.stdout and "worker 1 of 2" in r.stdout, r.stdout
    (out / "torchrun.log").write_text(r.stderr)
    return out


@needs_tiny
def test_redteam_in_two_processes_equals_one(runs):
    one, two = _json(runs / "one/redteam/redteam.json"), _json(runs / "r0/redteam/redteam.json")
    assert list(two["attacks"]) == ["prefix", "inversion"] and len(two["revival"]["fractions"]) == 6
    assert _without(two, "seconds") == _without(one, "seconds")
    assert torch.equal(_pixels(runs / "r0/redteam/redteam.png"), _pixels(runs / "one/redteam/redteam.png"))


@needs_tiny
def test_audit_in_two_processes_equals_one(runs):
    one, two = _json(runs / "one/audit/audit.json"), _json(runs / "r0/audit/audit.json")
    assert two["steps"] == [2, 4] and len(two["presence_after"]) == 2
    rounded = ("seconds", "loss", "presence_after", "resurgence")
    assert _without(two, *rounded) == _without(one, *rounded)  # the readings before the fine-tune: exact
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and len(one["loss"]) == 4
    assert two["presence_after"] == pytest.approx(one["presence_after"], rel=TOL_AUDIT, abs=TOL_AUDIT)
    assert two["resurgence"] == pytest.approx(one["resurgence"], rel=TOL_AUDIT, abs=TOL_AUDIT)


@needs_tiny
def test_evaluate_in_two_processes_equals_one(runs):
    base_one, base_two = runs / "one/cold/report", runs / "r0/cold/report"
    assert _read(f"{base_two}.csv") == _read(f"{base_one}.csv")
    assert "attack:prefix" in _read(f"{base_two}.csv").splitlines()[0]
    assert torch.equal(_pixels(f"{base_two}_worst.png"), _pixels(f"{base_one}_worst.png"))
    one, two = _counts(_read(f"{base_one}.md")), _counts(_read(f"{base_two}.md"))
    # the counts are summed over the processes (the grid's pictures, read back by rank 0, included).
    # One picture may be drawn twice: inversion finds one prompt for every case, so two cases whose
    # seeds meet (12 = 11 + 1) ask for the same picture from two chunks; one process reads it back
    # from the cache, the two processes each draw it at the same time
    assert two["judged"] == one["judged"] and two["judged_cached"] == one["judged_cached"] == 0
    assert two["generated"] + two["pictures_cached"] == one["generated"] + one["pictures_cached"]
    assert one["generated"] <= two["generated"] <= one["generated"] + 1


@needs_tiny
def test_evaluate_restarted_with_another_world_size_and_private_caches(runs):
    part = _counts(_read(runs / "one/part/report.md"))
    rest = _counts(_read(runs / "r0/restart/report.md"))
    whole = _counts(_read(runs / "one/cold/report.md"))
    # rank 1 held the first prompt's judgements: taken from it, not computed again; the rest computed
    # once (one more held: the judgement of the picture two cases share, see above)
    assert part["judged"] > 0 and part["judged"] <= rest["judged_cached"] <= part["judged"] + 1
    assert rest["judged"] + rest["judged_cached"] == whole["judged"]
    assert _read(runs / "r0/restart/report.csv") == _read(runs / "one/cold/report.csv")
    # rank 0's cache now holds every judgement and attack (what rank 1 held or computed, adopted): one
    # process on it alone computes nothing
    shutil.rmtree(runs / "again", ignore_errors=True)
    assert _main(evaluate_args(str(runs / "again"), str(runs / "edit.safetensors"), str(runs / "prompts.csv"),
                               str(runs / "cache-r0"), "--worst", "0")) == 0
    again = _counts(_read(runs / "again/report.md"))
    assert again["judged"] == 0 and again["generated"] == 0 and again["judged_cached"] == whole["judged"]
    assert _read(runs / "again/report.csv") == _read(runs / "one/cold/report.csv")


@needs_tiny
def test_only_rank_0_writes(runs):
    assert not (runs / "r1").exists()
    assert sorted(os.listdir(runs / "r0")) == ["audit", "cold", "redteam", "restart"]
    assert sorted(os.listdir(runs / "r0/cold")) == ["report.csv", "report.md", "report_chart.png", "report_worst.png"]
    assert sorted(os.listdir(runs / "r0/redteam")) == ["redteam.json", "redteam.png"]
    assert os.listdir(runs / "r0/audit") == ["audit.json"]


@needs_tiny
def test_each_attack_ran_once_in_the_whole_job(runs):
    """The red team's two attacks, then the benchmark's cold run's two (concept, attack) pairs, each on
    one of the processes; the restart found its pairs in rank 1's cache and ran none."""
    log = _read(runs / "torchrun.log")
    assert log.count("red team prefix:") == 2 and log.count("red team inversion:") == 2
