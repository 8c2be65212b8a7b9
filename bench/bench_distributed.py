"""EMCID stage 1 batched and split over processes (docs/distributed.md).

  bash run.sh bench bench_distributed --part batch   stage 1 on the tiny model for 1/8(/64) concepts
                                                     (--sizes), batched vs one at a time in one run:
                                                     seconds sampling the pictures and optimising,
                                                     denoiser forwards per concept, sampler calls per
                                                     concept of the batched run (bench_emcid's stage-1
                                                     measurement)
  bash run.sh bench bench_distributed --part scale   `conceptedit emcid` on the tiny model for --concepts
                                                     concepts in 1 process and under torchrun in 2 gloo
                                                     processes (--procs), no cache: stage-1 and stage-2
                                                     seconds and the wall time of each run

  bash run.sh bench bench_distributed --part commands
                                                     unlearn, distill, redteam, audit and evaluate through the
                                                     CLI on the tiny model, 1 process against torchrun's 2 gloo
                                                     processes (--procs), in one run: wall seconds and ratio

Each run of --part scale and --part commands is the real CLI in fresh processes (a subprocess per run), so the numbers
include what every process pays: ComfyUI and the model load, the pictures stage 1 draws for its concepts.
On a machine with fewer cores than processes × threads, the processes compete for the cores: give the
core count with the numbers.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

log = logging.getLogger("bench_distributed")


def part_batch(sizes, steps: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_emcid import part_stage1  # noqa: E402
    from conceptedit.comfy_host.locate import ensure_comfy
    ensure_comfy(cpu=True)
    return part_stage1(sizes, steps)


def _pairs(n: int) -> str:
    from conceptedit.tiny import world
    names = [f"{c} {s}" for s in world.SHAPES for c in world.COLOURS]
    return "".join(f"{names[i % len(names)]}{'' if i < len(names) else f' {i}'},{world.SHAPES[i % len(world.SHAPES)]}\n"
                   for i in range(n))


def _launch(procs: int) -> tuple[list[str], dict]:
    """(the command prefix, the environment) of a run in `procs` processes: torchrun for several, every
    process one thread per core it has to itself (torchrun sets 1 with several processes)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
              if procs > 1 else [sys.executable])
    return launch, dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // procs)))


def part_scale(n: int, steps: int, procs_list, batch: int) -> dict:
    import torch
    from conceptedit.editing.edit import Edit
    out = {"concepts": n, "steps": steps, "stage1_batch": batch, "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        pairs = os.path.join(tmp, "pairs.csv")
        with open(pairs, "w") as f:
            f.write(_pairs(n))
        for procs in procs_list:
            edit_path = os.path.join(tmp, f"e{procs}.safetensors")
            args = [os.path.join(ROOT, "conceptedit.py"), "emcid", "--ckpt", "tiny", "--cpu", "--pairs", pairs, "--out",
                    edit_path, "--cache-dir", "", "--steps", str(steps), "--stage1-batch", str(batch)]
            launch, env = _launch(procs)
            t = time.perf_counter()
            r = subprocess.run(launch + args, capture_output=True, text=True, env=env, cwd=tmp)
            wall = time.perf_counter() - t
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            e = Edit.load(edit_path)
            row = {"procs": procs, "threads_per_proc": int(env["OMP_NUM_THREADS"]), "wall_s": round(wall, 1),
                   "stage1_s": e.metrics["seconds"]["stage1"], "stage2_s": e.metrics["seconds"]["stage2"],
                   "stage1_s_per_concept": round(e.metrics["seconds"]["stage1"] / n, 3)}
            row["z_first"] = [c.delta(dtype=torch.float64) for _, c in sorted(e.changes.items())]
            log.info("%s", {k: v for k, v in row.items() if k != "z_first"})
            out["runs"].append(row)
    base = out["runs"][0]
    for row in out["runs"]:
        row["stage1_speedup"] = round(base["stage1_s"] / row["stage1_s"], 2)
        row["wall_speedup"] = round(base["wall_s"] / row["wall_s"], 2)
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(row["z_first"], base["z_first"]))
        row["max_rel_diff_edit_vs_1_process"] = diff
    for row in out["runs"]:
        del row["z_first"]
    return out


def _command_args(name: str, tmp: str) -> list[str]:
    """The arguments of one timed command (the inputs from `_command_inputs`), sized so the work splits
    into several rows, attacks or chunks per process."""
    edit, prompts = os.path.join(tmp, "prune.safetensors"), os.path.join(tmp, "prompts.csv")
    concept = ["--concept", "red"]
    shown = [a for p in ("a red circle", "a red square") for a in ("--prompt", p)]
    return {
        "unlearn": ["unlearn", *concept, "--steps", "20", "--batch", "8", "--n-prompts", "8", "--gen-steps", "10"],
        "distill": ["distill", "--student-edit", edit, *concept, "--steps", "20", "--erase-every", "5", "--batch", "8",
                    "--n-prompts", "8", "--gen-steps", "10"],
        "redteam": ["redteam", "--edit", edit, *concept, *shown, "--attacks", "prefix,inversion", "--steps", "10",
                    "--samples", "2", "--sample-steps", "10"],
        "audit": ["audit", "--edit", edit, *concept, *shown, "--benign", "a blue square", "--benign", "a green circle",
                  "--steps", "10,20"],
        "evaluate": ["evaluate", "--edit", edit, "--prompts", prompts, *concept, "--judge", "classifier,presence",
                     "--samples", "2", "--steps", "10", "--batch", "4", "--cache", ""],
    }[name]


def _command_inputs(tmp: str) -> None:
    """The pruning edit the audits and the student read, and the benchmark's prompts (not timed)."""
    from conceptedit.tiny import world
    with open(os.path.join(tmp, "prompts.csv"), "w") as f:
        f.write("prompt,evaluation_seed,evaluation_guidance,class\n")
        for i, (c, s) in enumerate((c, s) for c in world.COLOURS[:4] for s in world.SHAPES[:4]):
            f.write(f"a {c} {s},{i},5.0,{c}\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "conceptedit.py"), "prune", "--ckpt", "tiny", "--cpu",
                        "--concept", "red", "--steps", "4", "--cache-dir", "", "--out",
                        os.path.join(tmp, "prune.safetensors")], capture_output=True, text=True, cwd=tmp)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])


def part_commands(procs_list, names) -> dict:
    out = {"cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-cmds-") as tmp:
        _command_inputs(tmp)
        for name in names:
            row = {"command": name}
            for procs in procs_list:
                cmd = _command_args(name, tmp)
                args = [os.path.join(ROOT, "conceptedit.py"), cmd[0], "--ckpt", "tiny", "--cpu", *cmd[1:]]
                args += {"unlearn": ["--out", "u.safetensors"], "distill": ["--out", "d.safetensors"],
                         "evaluate": ["--out", os.path.join(tmp, f"report{procs}.md")]}.get(name, [])
                launch, env = _launch(procs)
                t = time.perf_counter()
                r = subprocess.run(launch + args, capture_output=True, text=True, env=env, cwd=tmp)
                if r.returncode:
                    raise SystemExit(f"{name} in {procs} processes: " + r.stderr[-3000:])
                row[f"wall_s_{procs}"] = round(time.perf_counter() - t, 1)
            base = row[f"wall_s_{procs_list[0]}"]
            for procs in procs_list[1:]:
                row[f"speedup_{procs}"] = round(base / row[f"wall_s_{procs}"], 2)
            log.info("%s", row)
            out["runs"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["batch", "scale", "commands", "all"], default="all")
    ap.add_argument("--sizes", default="1,8", help="concept counts for --part batch (64 too where time allows)")
    ap.add_argument("--steps", type=int, default=10, help="stage-1 steps per concept")
    ap.add_argument("--concepts", type=int, default=16, help="concepts for --part scale")
    ap.add_argument("--procs", default="1,2", help="process counts for --part scale")
    ap.add_argument("--stage1-batch", type=int, default=0, help="--part scale: concepts per stage-1 batch (0: automatic)")
    ap.add_argument("--commands", default="unlearn,distill,redteam,audit,evaluate", help="--part commands: which")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--write-pairs", default="", help="only write the --concepts pairs --part scale edits to this "
                                                      "file (the 1,000-concept run of docs/distributed.md) and stop")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.write_pairs:
        with open(a.write_pairs, "w") as f:
            f.write(_pairs(a.concepts))
        return
    res = {}
    if a.part in ("batch", "all"):
        res["batch"] = part_batch([int(s) for s in a.sizes.split(",")], a.steps)
    if a.part in ("scale", "all"):
        res["scale"] = part_scale(a.concepts, a.steps, [int(p) for p in a.procs.split(",")], a.stage1_batch)
    if a.part == "commands":
        res["commands"] = part_commands([int(p) for p in a.procs.split(",")], a.commands.split(","))
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
