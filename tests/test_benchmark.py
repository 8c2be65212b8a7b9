"""The erasure benchmark: prompt files in the papers' layouts, the resumable cache, and the
runner on the real tiny model inside the real ComfyUI (original vs a UCE erase of "red")."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from conceptedit.editing.benchmark.cache import ResultCache, edit_fingerprint
from conceptedit.editing.benchmark.judges import parse_judges
from conceptedit.editing.benchmark.prompts import PromptCase, read_prompts
from conceptedit.editing.benchmark.runner import Settings
from conceptedit.editing.errors import Cancelled, InvalidInputError
from conceptedit.editing.hosts import RunContext


def _write(path, text, bom=False):
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ---- prompt files ------------------------------------------------------------------------------

def test_csv_in_the_papers_layout(tmp_path):
    path = _write(tmp_path / "i2p.csv",
                  "case_number,prompt,evaluation_seed,evaluation_guidance,categories,class,hard,extra_col\n"
                  '7,"a red circle, plain",42,7.5,"sexual, violence",red,1,x\n'
                  '8,"a blue\nstar",43.0,5,,blue,0,y\n', bom=True)
    a, b = read_prompts(path)
    assert a == PromptCase("a red circle, plain", 42, 7.5, 7, ("sexual", "violence"), "red", "i2p", 2,
                           {"hard": "1", "extra_col": "x"})
    assert (b.prompt, b.seed, b.guidance, b.case_number, b.categories, b.label) == ("a blue\nstar", 43, 5.0, 8, (), "blue")
    # only the prompt column: seeds from the base seed, the run's cfg, row numbers as cases
    path = _write(tmp_path / "min.csv", "Prompt\na cat\n\n\"x, y\"\n")
    cases = read_prompts(path, base_seed=10)
    assert [(c.prompt, c.seed, c.guidance, c.case_number) for c in cases] == [("a cat", 10, None, 0), ("x, y", 11, None, 1)]
    # the ESD repository's Imagenette list: a leading unnamed pandas index column
    path = _write(tmp_path / "imagenette.csv", ",case_number,prompt,evaluation_seed,class\n0,0,Image of church,987,church\n")
    c = read_prompts(path)[0]
    assert (c.prompt, c.seed, c.label, c.extra) == ("Image of church", 987, "church", {})
    # I2P's own column names
    path = _write(tmp_path / "hf.csv", "prompt,sd_seed,sd_guidance_scale\na dog,5,6\n")
    assert (read_prompts(path)[0].seed, read_prompts(path)[0].guidance) == (5, 6.0)


def test_text_file_and_folder(tmp_path):
    _write(tmp_path / "b.txt", "# artists\na monet circle\n\n  a plain square  \n")
    _write(tmp_path / "a.csv", "prompt,evaluation_seed\na red star,3\n")
    _write(tmp_path / "notes.md", "ignored")
    txt = read_prompts(str(tmp_path / "b.txt"), base_seed=100)
    assert [(c.prompt, c.seed, c.line) for c in txt] == [("a monet circle", 100, 2), ("a plain square", 101, 4)]
    both = read_prompts(str(tmp_path))
    assert [(c.set, c.prompt) for c in both] == [("a", "a red star"), ("b", "a monet circle"), ("b", "a plain square")]
    assert len(read_prompts(str(tmp_path), limit=2)) == 2


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("prompt,evaluation_seed\n", "no prompt"),
    ("text,seed\na,1\n", "line 1: no 'prompt' column"),
    ("prompt,evaluation_seed\na cat,1\na dog,x1\n", "line 3: evaluation_seed 'x1' is not a number"),
    ("prompt,evaluation_seed\na cat,1.5\n", "line 2: evaluation_seed '1.5' is not a whole number"),
    ("prompt,evaluation_seed\na, cat,1\n", "line 2: 3 fields for 2 columns"),
])
def test_malformed_prompt_files_name_the_line(tmp_path, text, needle):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(InvalidInputError, match=needle):
        read_prompts(path)


def test_empty_text_file_and_unknown_judge(tmp_path):
    with pytest.raises(InvalidInputError, match="no prompt"):
        read_prompts(_write(tmp_path / "e.txt", "\n# nothing\n"))
    with pytest.raises(InvalidInputError, match="no prompt file"):
        read_prompts(str(tmp_path / "missing.csv"))
    assert parse_judges("Classifier, presence,classifier") == ["classifier", "presence"]
    with pytest.raises(InvalidInputError, match="unknown judge 'nudity'"):
        parse_judges("presence,nudity")


# ---- the cache ---------------------------------------------------------------------------------

def test_cache_refuses_corrupt_and_foreign_entries(tmp_path):
    cache = ResultCache(str(tmp_path))
    k1, k2 = {"what": "a", "seed": 1}, {"what": "a", "seed": 2}
    cache.put_json(k1, {"labels": {"colour": "red"}})
    cache.put_tensor(k1, torch.arange(6.0).reshape(2, 3))
    assert cache.get_json(k1) == {"labels": {"colour": "red"}}
    assert torch.equal(cache.get_tensor(k1), torch.arange(6.0).reshape(2, 3))
    assert cache.get_json(k2) is None and cache.refused == 0
    # another key's file under this key's name: refused
    for ext in (".json", ".safetensors"):
        src, dst = cache._path(k1, ext), cache._path(k2, ext)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    assert cache.get_json(k2) is None and cache.get_tensor(k2) is None and cache.refused == 2
    # a changed value, a torn file, garbage: refused
    path = cache._path(k1, ".json")
    entry = json.load(open(path))
    entry["value"]["labels"]["colour"] = "blue"
    json.dump(entry, open(path, "w"))
    assert cache.get_json(k1) is None
    data = open(cache._path(k1, ".safetensors"), "rb").read()
    open(cache._path(k1, ".safetensors"), "wb").write(data[:-4])
    assert cache.get_tensor(k1) is None
    open(path, "wb").write(b"\x00garbage")
    assert cache.get_json(k1) is None and cache.refused == 5
    assert not glob.glob(str(tmp_path / "*" / ".tmp-*"))  # no temporary file left behind
    assert ResultCache(None).get_json(k1) is None


# ---- on the tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(comfy):
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny.comfy_model import load_tiny
    torch.manual_seed(0)
    model, clip, _ = load_tiny()
    with torch.inference_mode():
        out = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], mode="erase", guide="", token_window="last")),
                         RunContext())
    return model, clip, out.model, out.edit


def _bench(tiny, cases, settings, judges, cache, ctx=None, calls=None, judge_options=None):
    from conceptedit.comfy_host.benchmark import benchmark_models
    model, clip, edited, edit = tiny
    count = None if calls is None else (lambda side, n: calls.append((side, n)))
    with torch.inference_mode():
        return benchmark_models(model, clip, edited, None, cases, settings, judges, edit_key=edit_fingerprint(edit),
                                erased=["red"], cache=cache, ctx=ctx or RunContext(), count=count,
                                judge_options=judge_options)


def _cases(n_per):
    from conceptedit.tiny import world
    out = []
    for colour, n in n_per.items():
        for i, (p, _) in enumerate(world.prompts_for(colour, n, seed=3)):
            out.append(PromptCase(p, seed=100 * len(out) + i, guidance=5.0, label=colour, set="colours"))
    return out


def test_resumed_run_equals_uninterrupted_and_recomputes_nothing(tiny, tmp_path, one_thread):
    cases = _cases({"red": 2, "blue": 1, "green": 1})
    settings = Settings(samples=1, steps=4, cfg=5.0, batch=2)
    judges = "classifier,presence"
    full_calls: list = []
    full = _bench(tiny, cases, settings, judges, ResultCache(str(tmp_path / "a")), calls=full_calls)
    assert sum(n for _, n in full_calls) == 8 and full.stats["generated"] == 8

    stop = {"now": False}

    def progress(done, total):
        stop["now"] = done >= 1  # Cancel once the first chunk is done
    with pytest.raises(Cancelled):
        _bench(tiny, cases, settings, judges, ResultCache(str(tmp_path / "b")),
               ctx=RunContext(progress=progress, should_stop=lambda: stop["now"]))
    calls: list = []
    resumed = _bench(tiny, cases, settings, judges, ResultCache(str(tmp_path / "b")), calls=calls)
    assert sum(n for _, n in calls) == 4  # only the second chunk, on both models
    assert resumed.stats["judged_cached"] == 8 and resumed.stats["judged"] == 8  # 2 pictures × 2 models × 2 judges
    assert resumed.per_image == full.per_image and resumed.rows == full.rows
    calls.clear()
    warm = _bench(tiny, cases, settings, judges, ResultCache(str(tmp_path / "b")), calls=calls)
    assert calls == [] and warm.rows == full.rows and warm.to_csv() == full.to_csv()

    # another edit of the same model shares the original's pictures and judgements
    other = (tiny[0], tiny[1], tiny[2], type(tiny[3])(**{**tiny[3].__dict__, "params": {**tiny[3].params, "x": 1}}))
    calls.clear()
    shared = _bench(other, cases, settings, judges, ResultCache(str(tmp_path / "b")), calls=calls)
    assert calls == [("edited", 2), ("edited", 2)] and shared.stats["judged_cached"] == 8

    # corrupt entries are refused and recomputed: every picture torn, one edited-side judgement garbled
    root = tmp_path / "a"
    for path in glob.glob(str(root / "*" / "*.safetensors")):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    target = next(p for p in glob.glob(str(root / "*" / "*.json"))
                  if (e := json.load(open(p)))["key"]["judge"]["name"] == "classifier"
                  and e["key"]["judged_by"] != "original")
    open(target, "w").write('{"format": "conceptedit-benchmark-cache", "version": 1, "value": ')
    calls.clear()
    cache = ResultCache(str(root))
    again = _bench(tiny, cases, settings, judges, cache, calls=calls)
    assert calls == [("edited", 1)] and cache.refused == 2 and again.per_image == full.per_image


def test_uce_red_erased_kept_colours_stay(tiny, tmp_path, one_thread):
    cases = _cases({"red": 3, "blue": 2, "green": 2})
    report = _bench(tiny, cases, Settings(samples=2, steps=20, cfg=5.0, batch=16), "classifier", ResultCache(None))
    acc = {r["class"]: r for r in report.rows if r["metric"] == "concept accuracy"}
    assert acc["red"]["role"] == "erased" and acc["red"]["n"] == 6
    assert acc["red"]["original"] >= 0.8 and acc["red"]["edited"] <= 0.2, acc["red"]
    for c in ("blue", "green"):
        assert acc[c]["role"] == "kept" and acc[c]["original"] >= 0.75 and acc[c]["edited"] >= 0.75, acc[c]
    flagged = next(r for r in report.rows if r["metric"] == "flagged share")
    assert flagged["original"] > flagged["edited"]
    spec = next(r for r in report.rows if r["metric"] == "specificity")
    assert spec["edited"] >= spec["original"] - 0.25
    md = report.to_markdown()
    assert "| classifier | all | concept accuracy | red | erased | 6 |" in md and "20 steps" in md
    assert report.to_csv().splitlines()[0] == "judge,set,metric,class,role,n,original,edited,change"


def test_presence_against_concept_free_twins(tiny, tmp_path, one_thread):
    """With the erased concepts named, a red prompt's presence is its gain minus its twin's ("a red
    circle" vs "a circle"): the erasure takes most of it away; prompts without red keep the plain gain,
    and the twins are part of the cache key."""
    cases = _cases({"red": 2, "blue": 1})
    settings = Settings(samples=1, steps=10, cfg=5.0, batch=4)
    cache = ResultCache(str(tmp_path / "c"))
    twin = _bench(tiny, cases, settings, "presence", cache, judge_options={"presence": {"concepts": ["red"]}})
    plain = _bench(tiny, cases, settings, "presence", cache)
    score = {(r["class"], which): r for which, rep in (("twin", twin), ("plain", plain)) for r in rep.rows
             if r["metric"] == "mean score" and r["class"] in ("red", "blue")}
    red = score[("red", "twin")]
    assert red["original"] > 0 and red["edited"] < 0.5 * red["original"], red
    assert score[("blue", "twin")]["original"] == pytest.approx(score[("blue", "plain")]["original"])
    assert score[("red", "plain")]["original"] > red["original"]  # the plain gain also counts the circle
    assert plain.stats["judged_cached"] == 0 and plain.stats["generated"] == 0  # pictures shared, scores not



# ---- metrics, attack columns, kept sets, the report (the runner alone, pure torch) --------------

COLOURS = ("red", "blue", "green")


class _Drawn:
    """A stand-in model: a picture is [index of the colour it draws] (-1: none). The edited model
    draws no red (and, with `breaks_green`, no green) unless the prompt holds the attack's word."""

    def __init__(self, edited=False, breaks_green=False):
        self.edited, self.breaks_green, self.calls = edited, breaks_green, []

    def __call__(self, prompts, seeds, cfg):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            c = next((i for i, w in enumerate(COLOURS) if w in p), -1)
            if self.edited and "xyzzy" not in p and (c == 0 or (c == 2 and self.breaks_green)):
                c = -1
            out.append(float(c))
        return torch.tensor(out)[:, None]


class _ColourJudge:
    """Reads the colour off a stand-in picture (what the tiny classifier does on real ones)."""
    name, reads = "colours", "own"

    def identity(self):
        return {"name": self.name}

    def judge(self, x, cases):
        return [{"labels": {"colour": COLOURS[int(v)] if v >= 0 else "none"}} for v in x[:, 0].tolist()]

    def summary(self, results):
        return {}


class _RedDetector(_ColourJudge):
    """A NudeNet-like judge: a 0/1 score and the classes found, with its own summary of a group."""
    name = "detector"

    def judge(self, x, cases):
        return [{"score": float(v == 0), "exposed": {"RED": 0.9} if v == 0 else {}} for v in x[:, 0].tolist()]

    def summary(self, results):
        n = len(results)
        return {"flagged share": sum(r["score"] for r in results) / n,
                "pictures with RED": float(sum("RED" in r["exposed"] for r in results))}


def _synthetic_cases():
    cases = [PromptCase(f"a {c} star {i}", seed=10 * k + i, label=c, set="colours") for k, c in enumerate(COLOURS)
             for i in range(2)]
    cases += [PromptCase(f"a {c} box", seed=90 + k, set="kept") for k, c in enumerate(("blue", "green"))]
    return cases


def _run_synthetic(tmp_path=None, breaks_green=False, worst=0):
    from conceptedit.editing.benchmark.runner import AttackRow, Side, run_benchmark
    gen_o, gen_e = _Drawn(), _Drawn(edited=True, breaks_green=breaks_green)
    judges = [_ColourJudge(), _RedDetector()]
    fp = {"family": "stand-in"}
    attack = AttackRow("prefix", lambda c: f"xyzzy {c.prompt}" if c.label == "red" else None,
                       {"concept": "red", "found": "xyzzy a red star 0", "steps": 3, "seconds": 0.1,
                        "verdict": "SUCCEEDS", "concept_prompts": ["a red star 0"]})
    cache = ResultCache(str(tmp_path) if tmp_path else None)
    report = run_benchmark(_synthetic_cases(), Side(fp, "original", gen_o, judges), Side(fp, "e1", gen_e, judges),
                           Settings(samples=2, steps=4, batch=4), erased=["red"], cache=cache, attacks=[attack],
                           kept_sets=["kept"], worst=worst)
    return report, gen_o, gen_e


def _row(report, judge, metric, set_="", cls=""):
    return next(r for r in report.rows if r["judge"] == judge and r["metric"] == metric
                and (not set_ or r["set"] == set_) and r["class"] == cls)


def test_metrics_attack_column_and_kept_set(tmp_path):
    report, _, gen_e = _run_synthetic(tmp_path / "c", breaks_green=True, worst=3)
    # the attacked column draws only the erased class's cases, with the attack's prompt and their own seeds
    attacked = [p for call in gen_e.calls for p in call if p.startswith("xyzzy")]
    assert sorted(attacked) == sorted(f"xyzzy a red star {i}" for i in range(2) for _ in range(2))
    flagged = _row(report, "colours", "flagged share", "colours")
    assert (flagged["n"], flagged["original"], flagged["edited"]) == (12, pytest.approx(4 / 12), 0.0)
    red = _row(report, "colours", "concept accuracy", cls="red")
    assert (red["role"], red["original"], red["edited"], red["attack:prefix"]) == ("erased", 1.0, 0.0, 1.0)
    blue, green = _row(report, "colours", "concept accuracy", cls="blue"), _row(report, "colours", "concept accuracy", cls="green")
    assert blue["role"] == "kept" and blue["edited"] == 1.0 and blue.get("attack:prefix") is None
    assert green["edited"] == 0.0
    spec = _row(report, "colours", "specificity", cls="(kept classes)")
    assert (spec["n"], spec["original"], spec["edited"]) == (8, 1.0, 0.5)
    # the kept file: the edit breaks its green prompt, not its blue one
    unchanged = _row(report, "colours", "unchanged", "kept")
    assert (unchanged["role"], unchanged["n"], unchanged["edited"]) == ("kept", 4, 0.5)
    asr = _row(report, "colours", "attack success rate", "colours")
    assert (asr["n"], asr["original"], asr["edited"], asr["attack:prefix"]) == (4, 1.0, 0.0, 1.0)
    # a judge's own summary: one row per aggregate and set; its flagged share gives its attack success rate
    det = _row(report, "detector", "pictures with RED", "colours")
    assert (det["original"], det["edited"]) == (4.0, 0.0)
    assert _row(report, "detector", "attack success rate", "colours")["attack:prefix"] == 1.0
    assert _row(report, "detector", "mean score", "kept")["role"] == "kept"
    # the worst cases: no red picture survived the edit, so the kept green pictures it lost come first;
    # the attack drew none of them, so it has no row in the grid
    assert [w["why"] for w in report.worst["items"]] == ["colours: lost its own class 'green'"] * 3
    assert set(report.worst["pictures"]) == {"original", "edited"}
    assert report.worst["pictures"]["original"][:, 0].tolist() == [2.0, 2.0, 2.0]

    # the report: the attack column in both tables, the attack's settings in the markdown, a chart
    header = report.to_csv().splitlines()[0]
    assert header == "judge,set,metric,class,role,n,original,edited,change,attack:prefix"
    md = report.to_markdown()
    assert "| colours | all | concept accuracy | red | erased | 4 | 1.000 | 0.000 | -1.000 | 1.000 |" in md
    assert "attack prefix on red (3 steps" in md and "'xyzzy a red star 0'" in md and "kept set(s): kept" in md
    groups = report.chart_groups()
    assert [g[0] for g in groups] == ["colours: concept accuracy per class", "detector: pictures per class (colours)"]
    assert groups[1][1] == [("RED", {"original": 4.0, "edited": 0.0})]
    from conceptedit.editing.benchmark.report import bar_chart
    img = bar_chart(groups)
    assert img.shape == (1, 2 * 260, 720, 3) and img.min() >= 0 and img.max() <= 1 and img.std() > 0.05

    # warm: nothing drawn or judged again, the same table
    warm, gen_o2, gen_e2 = _run_synthetic(tmp_path / "c", breaks_green=True)
    assert gen_o2.calls == [] and gen_e2.calls == [] and warm.rows == report.rows


def test_found_prompt_and_time_formula():
    from conceptedit.editing.benchmark.report import formula_text, projected_seconds, time_parts
    from conceptedit.editing.benchmark.runner import found_prompt
    assert found_prompt("qq rr a red star", "a red star")("a red box") == "qq rr a red box"
    assert found_prompt("a photo of qq", "a red star")("a red box") == "a photo of qq"
    stats = {"generated": 10, "generate_s": 20.0, "judge_s_by": {"classifier": 1.0, "presence": 4.0},
             "judged_by": {"classifier": 10, "presence": 10}}
    parts = time_parts(stats, steps=20)
    assert parts == {"step_s": pytest.approx(0.1), "judge_s": {"classifier": 0.1, "presence": 0.4}}
    # 4,703 prompts x 2 samples x 2 models x (20 x 0.1 + 0.5) s
    assert projected_seconds(parts, 4703, 2, 20) == pytest.approx(4703 * 2 * 2 * 2.5)
    assert "20 × 0.1 s" not in formula_text(parts, 20) and "steps × 0.1 s" in formula_text(parts, 20)
    assert projected_seconds(time_parts({"generated": 0}, 20), 10, 1, 20) is None


def test_prompt_box_reads_a_path_a_name_in_the_input_folder_or_the_prompts(tmp_path):
    from conceptedit.editing.benchmark.prompts import prompts_from_text_or_path
    _write(tmp_path / "i2p.csv", "prompt,evaluation_seed,class\na red star,7,red\n")
    by_name = prompts_from_text_or_path("i2p.csv", search=[str(tmp_path)])
    assert [(c.prompt, c.seed, c.label, c.set) for c in by_name] == [("a red star", 7, "red", "i2p")]
    assert prompts_from_text_or_path(str(tmp_path / "i2p.csv")) == by_name
    lines = prompts_from_text_or_path("a cat\n# note\na dog", base_seed=4)
    assert [(c.prompt, c.seed, c.set) for c in lines] == [("a cat", 4, "prompts"), ("a dog", 5, "prompts")]
    text_csv = prompts_from_text_or_path("prompt,evaluation_seed\n\"a, b\",3\nc,4", name="box")
    assert [(c.prompt, c.seed) for c in text_csv] == [("a, b", 3), ("c", 4)]
    assert prompts_from_text_or_path("  ") == []
    assert [c.prompt for c in prompts_from_text_or_path("a single prompt")] == ["a single prompt"]
    with pytest.raises(InvalidInputError, match="no prompt file 'missing.csv'.*input folder"):
        prompts_from_text_or_path("missing.csv", search=[str(tmp_path)])


def test_tensor_bytes_reads_a_column_whose_last_stride_is_not_one():
    """A transposed row (shape [n, 1], strides (1, n)) is contiguous to torch but refuses a byte view
    as it is; its bytes must equal those of the same values stored plainly (EMCID's factors)."""
    from conceptedit.editing.distributed import tensor_bytes, tensor_digest
    col = torch.arange(4.0).view(1, 4).t()
    assert col.is_contiguous() and col.stride(-1) != 1
    assert tensor_bytes(col) == tensor_bytes(col.clone().reshape(4, 1).contiguous().clone())
    assert tensor_bytes(col) != tensor_bytes(col + 1)
    assert tensor_digest({"x": col}) == tensor_digest({"x": col.clone().reshape(4, 1).contiguous().clone()})
