"""The Erasure Benchmark node inside the real ComfyUI on the tiny model: its V3 schema, its outputs
and files, the same numbers as `conceptedit evaluate` on the same settings (attack column
included), and a run cancelled through ComfyUI's interrupt that resumes to the same table."""
from __future__ import annotations

import argparse
import csv
import io
import os
import re

import pytest
import torch

NODE_ID = "ConceptEditErasureBenchmark"


def _node(comfy):
    """The class ComfyUI registered for the node ID (the pack's registry lists nodes_benchmark.NODES)."""
    from conceptedit.nodes import nodes_benchmark
    cls = comfy.NODE_CLASS_MAPPINGS[NODE_ID]
    assert cls in nodes_benchmark.NODES
    return cls


def _execute(cls, **kwargs):
    """As ComfyUI's executor runs a V3 node: a prepared clone of the class, under inference mode."""
    clone = cls.PREPARE_CLASS_CLONE({})
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**kwargs)


@pytest.fixture(scope="module")
def tiny_edit(comfy, tmp_path_factory):
    """The tiny model, its VAE, a UCE erase of "red" and that edit saved as a file (for the command)."""
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.hosts import RunContext
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, vae = load_tiny()
    with torch.inference_mode():
        edit = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], mode="erase", guide="",
                                                                 token_window="last")), RunContext()).edit
    path = str(tmp_path_factory.mktemp("edit") / "erase_red.safetensors")
    edit.save(path)
    return model, clip, vae, edit, path


def _prompt_csv(path, seed0=500):
    from conceptedit.tiny import world
    rows = ["prompt,evaluation_seed,evaluation_guidance,class"]
    for k, colour in enumerate(("red", "blue", "green")):
        for i, (p, _) in enumerate(world.prompts_for(colour, 2, seed=5)):
            rows.append(f"{p},{seed0 + 10 * k + i},5,{colour}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _table(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_schema_is_v3_with_a_tooltip_on_every_input(comfy):
    cls = _node(comfy)
    schema = cls.GET_SCHEMA()
    assert schema.node_id == NODE_ID and schema.category == "ConceptEdit" and schema.is_output_node
    assert [o.io_type for o in schema.outputs] == ["STRING", "IMAGE", "IMAGE"]
    missing = [i.id for i in schema.inputs if not (i.tooltip or "").strip()]
    assert not missing, missing
    assert {"model", "clip", "vae", "prompts", "judges", "samples", "steps", "cfg", "seed", "edited_model",
            "edited_clip", "edit", "attacks"} <= {i.id for i in schema.inputs}
    assert "nudenet" in next(i for i in schema.inputs if i.id == "judges").tooltip  # the registry's judges


def test_node_equals_the_command_with_an_attack_column(comfy, tiny_edit, tmp_path, one_thread):
    import folder_paths
    from conceptedit.cli import evaluate
    model, clip, vae, edit, edit_path = tiny_edit
    prompts = _prompt_csv(tmp_path / "colours.csv")
    # the node reads the file by its name in ComfyUI's input folder
    os.makedirs(folder_paths.get_input_directory(), exist_ok=True)
    with open(os.path.join(folder_paths.get_input_directory(), "bench_colours.csv"), "w") as f:
        f.write(_read(prompts))
    out = _execute(_node(comfy), model=model, clip=clip, vae=vae, prompts="bench_colours.csv", judges="classifier",
                   samples=2, steps=8, cfg=5.0, seed=3, sampler_name="euler", scheduler="normal", edit=edit,
                   attacks="prefix", attack_steps=3, worst=4, cache=False, filename_prefix="bench_test/run")
    text, chart, grid = out.result
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    # the grid: 3 rows (original, edited, the attack) of the 4 worst cases, 256-px tiny-VAE pictures, 2-px pads
    assert tuple(grid.shape) == (1, 3 * 258 + 2, 4 * 258 + 2, 3), grid.shape
    files = re.search(r"table: (.*)$", text, re.MULTILINE).group(1).split(", ")
    assert [os.path.splitext(f)[1] for f in files] == [".md", ".csv"]
    assert all(os.path.isfile(f) and f.startswith(folder_paths.get_output_directory()) for f in files)
    node_table = _table(_read(files[1]))
    assert "attack:prefix" in node_table[0]
    asr = next(r for r in node_table if r["metric"] == "attack success rate")
    acc = {r["class"]: r for r in node_table if r["metric"] == "concept accuracy"}
    assert acc["red"]["role"] == "erased" and acc["red"]["n"] == "4" and acc["red"]["attack:prefix"] != ""
    assert acc["blue"]["attack:prefix"] == ""  # kept classes are not attacked
    assert float(acc["red"]["original"]) > float(acc["red"]["edited"])
    assert asr["n"] == "4" and 0.0 <= float(asr["attack:prefix"]) <= 1.0

    # the command on the same settings (its own fresh run, no cache): the same table, number for number
    out_md = str(tmp_path / "cli" / "report.md")
    p = argparse.ArgumentParser()
    evaluate.register(p.add_subparsers())
    args = p.parse_args(["evaluate", "--ckpt", "tiny", "--cpu", "--edit", edit_path, "--prompts", prompts,
                         "--judge", "classifier", "--samples", "2", "--steps", "8", "--cfg", "5", "--seed", "3",
                         "--attack", "prefix", "--attack-steps", "3", "--worst", "4", "--cache", "", "--out", out_md])
    assert evaluate.run(args) == 0
    cli_table = _table(_read(out_md[:-3] + ".csv"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "set"} for r in rows]
    assert strip(cli_table) == strip(node_table)
    assert os.path.isfile(out_md[:-3] + "_chart.png") and os.path.isfile(out_md[:-3] + "_worst.png")


def test_cancel_through_comfyui_then_resume_gives_the_same_table(comfy, tiny_edit, tmp_path, one_thread, monkeypatch):
    import importlib
    mm = importlib.import_module("comfy.model_management")
    utils = importlib.import_module("comfy.utils")  # (`comfy` here is ComfyUI's nodes module, the fixture)
    model, clip, vae, edit, _ = tiny_edit
    prompts = _read(_prompt_csv(tmp_path / "p.csv", seed0=9100))  # the prompts as text in the box
    kw = {"model": model, "clip": clip, "vae": vae, "prompts": prompts, "judges": "classifier", "samples": 1,
          "steps": 6, "cfg": 5.0, "seed": 0, "sampler_name": "euler", "scheduler": "normal", "edit": edit, "batch": 2,
          "worst": 0}
    whole = _execute(_node(comfy), cache=False, filename_prefix="bench_test/whole", **kw).result[0]

    real = utils.ProgressBar.update_absolute

    def interrupt_after_first_chunk(self, value, total=None, preview=None):
        real(self, value, total, preview)
        if value >= 1:
            mm.interrupt_current_processing(True)
    monkeypatch.setattr(utils.ProgressBar, "update_absolute", interrupt_after_first_chunk)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _execute(_node(comfy), cache=True, filename_prefix="bench_test/cancelled", **kw)
    finally:
        mm.interrupt_current_processing(False)
    monkeypatch.setattr(utils.ProgressBar, "update_absolute", real)
    resumed = _execute(_node(comfy), cache=True, filename_prefix="bench_test/resumed", **kw).result[0]
    made = re.search(r"pictures generated (\d+), .*; judge results computed (\d+), cached (\d+)", resumed)
    # 6 prompts x 2 models: the first chunk's 2 prompts were judged before Cancel, and are not drawn again
    assert tuple(int(g) for g in made.groups()) == (8, 8, 4), made.group(0)
    table = lambda t: t.split("\n\n")[0]
    assert table(resumed) == table(whole)


def test_the_judges_decoder_is_the_vae(comfy, tiny_edit):
    """Judges that look at pictures (nudenet, clip) read what the checkpoint's VAE decodes, as [B, 3, H, W]
    in [-1, 1]: on the tiny model that is its pixel latents upsampled ×8."""
    from conceptedit.comfy_host.benchmark import tiny_pictures, vae_pictures
    _, _, vae, _, _ = tiny_edit
    x = torch.rand(2, 4, 32, 32) * 2.4 - 1.2
    pics = vae_pictures(vae)(x)
    assert pics.shape == (2, 3, 256, 256) and pics.min() >= -1 and pics.max() <= 1
    torch.testing.assert_close(pics[:, :, ::8, ::8], tiny_pictures(x), atol=1e-2, rtol=0)
