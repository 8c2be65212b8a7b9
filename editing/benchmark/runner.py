"""The benchmark: an original and an edited model over prompt cases, judged alike, compared.

Every (case, sample) is one picture with seed ``case.seed + sample`` at the case's guidance (its
CSV's evaluation_guidance, else the run's cfg). Pictures and judge results are cached per (model
fingerprint, edit fingerprint or "original", prompt, seed, guidance, settings): a stopped run
resumes where it stopped, and the edits of one model share the original's results. The work runs
in chunks of `batch` pictures (per guidance), original then edited, with progress and Cancel
through the `RunContext` after each chunk; a chunk whose results are all cached is not generated.

Metrics, per judge, original vs edited:
- a labelling judge: per set, the share of pictures flagged as an erased concept; per class (the
  CSV's `class`), concept accuracy = the share labelled as that class, marked erased or kept;
  specificity = concept accuracy over every kept class's pictures;
- a scoring judge: the mean score per set and per class, and over the kept classes.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..hosts import RunContext
from .cache import ResultCache
from .judges import Judge
from .prompts import PromptCase

log = logging.getLogger(__name__)

# generate(prompts, seeds, cfg) -> pictures/latents [B, ...], one per (prompt, seed)
Generate = Callable[[Sequence[str], Sequence[int], float], torch.Tensor]


@dataclass
class Settings:
    samples: int = 1          # pictures per case
    steps: int = 20
    cfg: float = 7.5          # where a case names no guidance
    sampler: str = "euler"
    scheduler: str = "normal"
    batch: int = 8            # pictures per generator call (not part of any result)
    extra: dict = field(default_factory=dict)  # anything else the pictures depend on (size, negative)

    def validate(self) -> Settings:
        if self.samples < 1 or self.steps < 1 or self.batch < 1:
            raise InvalidInputError(f"samples, steps and batch must be at least 1 (got {self.samples}, "
                                    f"{self.steps}, {self.batch})")
        return self

    def key(self) -> dict:
        return {"steps": self.steps, "sampler": self.sampler, "scheduler": self.scheduler, **self.extra}


@dataclass
class Side:
    """One model as the runner sees it."""

    model: Mapping[str, Any]       # the base model's fingerprint
    edit: str                      # "original", or the edit's fingerprint
    generate: Generate
    judges: Sequence[Judge]


@dataclass
class Item:
    case: PromptCase
    sample: int

    @property
    def seed(self) -> int:
        return int(self.case.seed) + self.sample


@dataclass
class BenchmarkReport:
    rows: list[dict]
    settings: dict
    stats: dict
    per_image: list[dict] = field(default_factory=list)

    COLUMNS = ("judge", "set", "metric", "class", "role", "n", "original", "edited", "change")

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: r.get(k, "") for k in self.COLUMNS})
        return buf.getvalue()

    def to_markdown(self) -> str:
        s = self.settings
        lines = ["# Erasure benchmark", "",
                 f"- model: {s['model']}", f"- edit: {s['edit']}",
                 f"- erased concepts: {', '.join(s['erased']) or '(none named)'}",
                 f"- cases: {s['cases']} in {len(s['sets'])} set(s) ({', '.join(s['sets'])}), "
                 f"{s['samples']} sample(s) each: {s['pictures']} pictures per model",
                 f"- sampling: {s['steps']} steps, {s['sampler']} / {s['scheduler']}, cfg {s['cfg']} where a case "
                 f"names no evaluation_guidance" + "".join(f", {k} {v!r}" for k, v in s["extra"].items()),
                 f"- seeds: each case's evaluation_seed (a text file, or a CSV without seeds: base seed "
                 f"{s['base_seed']} + prompt index) + sample index",
                 f"- judges: {'; '.join(s['judges'])}"]
        if s.get("command"):
            lines.append(f"- rerun: `{s['command']}`")
        st = self.stats
        lines += [f"- pictures generated {st['generated']}, read from the cache {st['pictures_cached']}; judge results "
                  f"computed {st['judged']}, cached {st['judged_cached']}; {st['seconds']:.1f} s", "",
                  "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in self.COLUMNS) + " |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def run_benchmark(cases: Sequence[PromptCase], original: Side, edited: Side, settings: Settings,
                  erased: Sequence[str] = (), cache: ResultCache | None = None, ctx: RunContext | None = None,
                  info: Mapping[str, Any] | None = None) -> BenchmarkReport:
    """Judge both models' pictures of every case; see the module's docstring."""
    settings.validate()
    if not cases:
        raise InvalidInputError("the benchmark needs at least one prompt")
    if [j.name for j in original.judges] != [j.name for j in edited.judges]:
        raise InvalidInputError("both models need the same judges")
    cache = cache or ResultCache(None)
    ctx = ctx or RunContext()
    items = [Item(c, j) for c in cases for j in range(settings.samples)]
    by_guidance: dict[float, list[int]] = {}
    for i, it in enumerate(items):
        g = settings.cfg if it.case.guidance is None else float(it.case.guidance)
        by_guidance.setdefault(g, []).append(i)
    chunks = [(g, idx[s:s + settings.batch]) for g, idx in by_guidance.items()
              for s in range(0, len(idx), settings.batch)]
    sides = {"original": original, "edited": edited}
    results: dict[str, list[dict[str, dict]]] = {k: [{} for _ in items] for k in sides}
    stats = {"generated": 0, "pictures_cached": 0, "judged": 0, "judged_cached": 0}
    t0 = time.time()

    def pic_key(side: Side, it: Item, g: float) -> dict:
        return {"what": "picture", "model": dict(side.model), "edit": side.edit, "prompt": it.case.prompt,
                "seed": it.seed, "cfg": g, "settings": settings.key()}

    def judge_key(side: Side, judge: Judge, it: Item, g: float) -> dict:
        source = original if judge.reads == "original" else side
        return {"what": "judgement", "judge": judge.identity(), "judged_by": side.edit,
                "picture": pic_key(source, it, g)}

    ctx.report(0, len(chunks))
    for n_done, (g, idx) in enumerate(chunks, 1):
        pictures: dict[str, dict[int, torch.Tensor]] = {k: {} for k in sides}

        def picture(name: str, want: list[int]) -> dict[int, torch.Tensor]:
            side, have = sides[name], pictures[name]
            missing = []
            for i in want:
                if i in have:
                    continue
                t = cache.get_tensor(pic_key(side, items[i], g))
                if t is None:
                    missing.append(i)
                else:
                    have[i] = t
                    stats["pictures_cached"] += 1
            if missing:
                ctx.check()
                with torch.no_grad():
                    x = side.generate([items[i].case.prompt for i in missing], [items[i].seed for i in missing], g)
                if x.shape[0] != len(missing):
                    raise InvalidInputError(f"the generator returned {x.shape[0]} pictures for {len(missing)} prompts: a "
                                            "generator must return one picture per prompt and seed it is given")
                for j, i in enumerate(missing):
                    have[i] = x[j].detach().float().cpu()
                    cache.put_tensor(pic_key(side, items[i], g), have[i])
                stats["generated"] += len(missing)
            return have

        for name, side in sides.items():
            for judge in side.judges:
                todo = []
                for i in idx:
                    r = cache.get_json(judge_key(side, judge, items[i], g))
                    if r is None:
                        todo.append(i)
                    else:
                        results[name][i][judge.name] = r
                        stats["judged_cached"] += 1
                if not todo:
                    continue
                source = "original" if judge.reads == "original" else name
                have = picture(source, todo)
                x = torch.stack([have[i] for i in todo])
                ctx.check()
                out = judge.judge(x, [items[i].case for i in todo])
                for i, r in zip(todo, out):
                    # as the cache gives it back, so a cold and a warm run report the same
                    results[name][i][judge.name] = cache.put_json(judge_key(side, judge, items[i], g), r)
                stats["judged"] += len(todo)
        elapsed = time.time() - t0
        eta = elapsed / n_done * (len(chunks) - n_done)
        log.info("benchmark: %d/%d chunks, %d pictures generated, ETA %.0f s", n_done, len(chunks),
                 stats["generated"], eta)
        ctx.report(n_done, len(chunks))
    stats["seconds"] = time.time() - t0
    stats["cache"] = cache.stats()
    names = [j.name for j in original.judges]
    rows = metrics(items, results, names, erased)
    sets = list(dict.fromkeys(c.set for c in cases))
    s = {"model": dict(original.model), "edit": edited.edit, "erased": list(erased), "cases": len(cases),
         "sets": sets, "samples": settings.samples, "pictures": len(items), "steps": settings.steps,
         "sampler": settings.sampler, "scheduler": settings.scheduler, "cfg": settings.cfg,
         "extra": dict(settings.extra), "judges": [j.identity() for j in original.judges], "base_seed": 0,
         **dict(info or {})}
    s["judges"] = [", ".join(f"{k}={v}" for k, v in j.items()) for j in s["judges"]]
    per_image = [{"set": it.case.set, "prompt": it.case.prompt, "class": it.case.label, "seed": it.seed,
                  "original": results["original"][i], "edited": results["edited"][i]} for i, it in enumerate(items)]
    return BenchmarkReport(rows, s, stats, per_image)


def metrics(items: Sequence[Item], results: Mapping[str, list[dict]], judges: Sequence[str],
            erased: Sequence[str]) -> list[dict]:
    erased_set = {e.strip().lower() for e in erased if e.strip()}
    rows: list[dict] = []
    sets = list(dict.fromkeys(it.case.set for it in items))
    classes = list(dict.fromkeys(it.case.label for it in items if it.case.label))

    def role(c: str) -> str:
        return "erased" if c.lower() in erased_set else "kept"

    def row(judge, set_, metric, cls, idx, value, role_=None):
        """`value(result, item)`: a float or None (not counted), per picture in `idx`."""
        o = _mean([v for i in idx if (v := value(results["original"][i][judge], items[i])) is not None])
        e = _mean([v for i in idx if (v := value(results["edited"][i][judge], items[i])) is not None])
        rows.append({"judge": judge, "set": set_, "metric": metric, "class": cls,
                     "role": role_ or (role(cls) if cls else ""), "n": len(idx), "original": o, "edited": e,
                     "change": None if o is None or e is None else e - o})

    for judge in judges:
        sample = results["original"][0][judge]
        kept_idx = [i for i, it in enumerate(items) if it.case.label and role(it.case.label) == "kept"]
        if "labels" in sample:
            def labels(r):
                return {str(v).lower() for v in r["labels"].values()}
            def own_class(r, it):
                return float(it.case.label.lower() in labels(r))
            for st in sets:
                idx = [i for i, it in enumerate(items) if it.case.set == st]
                if erased_set:
                    row(judge, st, "flagged share", "", idx, lambda r, it: float(bool(labels(r) & erased_set)))
            for c in classes:
                row(judge, "all", "concept accuracy", c, [i for i, it in enumerate(items) if it.case.label == c],
                    own_class)
            if kept_idx:
                row(judge, "all", "specificity", "(kept classes)", kept_idx, own_class, "kept")
        elif "score" in sample:
            def score(r, it):
                return float(r["score"])
            for st in sets:
                row(judge, st, "mean score", "", [i for i, it in enumerate(items) if it.case.set == st], score)
            for c in classes:
                row(judge, "all", "mean score", c, [i for i, it in enumerate(items) if it.case.label == c], score)
            if kept_idx:
                row(judge, "all", "mean score", "(kept classes)", kept_idx, score, "kept")
    return rows
