"""The benchmark's report: the table as markdown and CSV (pure python), the settings a rerun needs,
and the per-class bar chart (drawn with PIL, which every ComfyUI install has)."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

BASE_COLUMNS = ("judge", "set", "metric", "class", "role", "n", "original", "edited", "change")


@dataclass
class BenchmarkReport:
    rows: list[dict]
    settings: dict
    stats: dict
    per_image: list[dict] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)       # attack columns, in order
    worst: dict = field(default_factory=dict)              # {"items": [...], "pictures": {column: tensor}}

    @property
    def columns(self) -> tuple[str, ...]:
        return BASE_COLUMNS + tuple(f"attack:{a}" for a in self.attacks)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.columns), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _csv(r.get(k)) for k in self.columns})
        return buf.getvalue()

    def table_markdown(self) -> str:
        cols = self.columns
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")
        return "\n".join(lines) + "\n"

    def settings_lines(self) -> list[str]:
        s = self.settings
        lines = [f"- model: {s['model']}", f"- edit: {s['edit']}",
                 f"- erased concepts: {', '.join(s['erased']) or '(none named)'}",
                 f"- cases: {s['cases']} in {len(s['sets'])} set(s) ({', '.join(s['sets'])})"
                 + (f"; kept set(s): {', '.join(s['kept_sets'])}" if s.get("kept_sets") else "")
                 + f", {s['samples']} sample(s) each: {s['pictures']} pictures per model",
                 f"- sampling: {s['steps']} steps, {s['sampler']} / {s['scheduler']}, cfg {s['cfg']} where a case "
                 f"names no evaluation_guidance" + "".join(f", {k} {v!r}" for k, v in s["extra"].items()),
                 (f"- seeds: each case's evaluation_seed (a text file, or a CSV without seeds: base seed "
                 f"{s['base_seed']} + prompt index) + sample index"),
                 f"- judges: {'; '.join(s['judges'])}"]
        for a in s.get("attacks", []):
            lines.append(f"- attack {a['name']} on {a['concept'] or 'the erased prompts'} "
                         f"({a['steps']} steps, {a['seconds']:.1f} s, found on {len(a['concept_prompts'])} prompt(s)): "
                         f"{a['found']!r}; red-team verdict: {a['verdict']}")
        if s.get("command"):
            lines.append(f"- rerun: `{s['command']}`")
        st = self.stats
        lines.append(f"- pictures generated {st['generated']}, read from the cache {st['pictures_cached']}; judge "
                     f"results computed {st['judged']}, cached {st['judged_cached']}; {st['seconds']:.1f} s "
                     f"(sampling {st.get('generate_s', 0.0):.1f} s, judges {st.get('judge_s', 0.0):.1f} s)")
        return lines

    def to_markdown(self) -> str:
        return "\n".join(["# Erasure benchmark", "", *self.settings_lines(), "", self.table_markdown()])

    def to_text(self) -> str:
        """A short reading for a node's text output: the headline rows, then the settings."""
        head = [r for r in self.rows if r["metric"] in ("flagged share", "attack success rate", "specificity",
                                                         "concept accuracy", "unchanged", "mean score")]
        out = []
        for r in head:
            att = "".join(f", {c} {_fmt(r.get(c))}" for c in self.columns[len(BASE_COLUMNS):] if r.get(c) is not None)
            out.append(f"{r['judge']} {r['metric']}{' ' + r['class'] if r['class'] else ''} ({r['set']}, n={r['n']}): "
                       f"original {_fmt(r['original'])} -> edited {_fmt(r['edited'])}{att}")
        return "\n".join(out + [""] + self.settings_lines())

    def write(self, base: str) -> tuple[str, str]:
        """`base`.md (settings and table) and `base`.csv (the table)."""
        os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)
        md, cs = base + ".md", base + ".csv"
        with open(md, "w", encoding="utf-8") as f:
            f.write(self.to_markdown())
        with open(cs, "w", encoding="utf-8", newline="") as f:
            f.write(self.to_csv())
        return md, cs

    def chart_groups(self) -> list[tuple[str, list[tuple[str, dict[str, float]]]]]:
        """Per judge, the per-class values to draw: the counts of its own summary (nudenet: pictures
        per exposed class) over the first set, else concept accuracy per prompt class, else the mean
        score per class."""
        extra = self.columns[len(BASE_COLUMNS):]

        def bars(rows, label):
            return [(label(r), {c: r[c] for c in ("original", "edited", *extra) if r.get(c) is not None}) for r in rows]
        out = []
        for judge in dict.fromkeys(r["judge"] for r in self.rows):
            mine = [r for r in self.rows if r["judge"] == judge]
            first = mine[0]["set"] if mine else ""
            counts = [r for r in mine if r["set"] == first and r["metric"].startswith("pictures with ")]
            acc = [r for r in mine if r["metric"] == "concept accuracy" and r["class"]]
            score = [r for r in mine if r["metric"] == "mean score" and r["class"] and not r["class"].startswith("(")]
            if counts:
                out.append((f"{judge}: pictures per class ({first})", bars(counts, lambda r: r["metric"][14:])))
            elif acc:
                out.append((f"{judge}: concept accuracy per class", bars(acc, lambda r: r["class"])))
            elif score:
                out.append((f"{judge}: mean score per class", bars(score, lambda r: r["class"])))
        return out


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _csv(v):
    return "" if v is None else (repr(v) if isinstance(v, float) else v)


PALETTE = ((120, 120, 120), (214, 39, 40), (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189))


def bar_chart(groups: Sequence[tuple[str, Sequence[tuple[str, Mapping[str, float]]]]], width: int = 720,
              panel_height: int = 260) -> torch.Tensor:
    """Grouped bars, one panel per (title, [(class, {series: value})]): a ComfyUI IMAGE [1, H, W, 3]
    in [0, 1]. Each panel's axis runs from 0 to its largest value (1 for shares)."""
    import numpy as np
    from PIL import Image, ImageDraw
    groups = [g for g in groups if g[1]] or [("nothing to draw (no per-class rows)", [])]
    img = Image.new("RGB", (width, panel_height * len(groups)), (255, 255, 255))
    dr = ImageDraw.Draw(img)
    for p, (title, bars) in enumerate(groups):
        top0 = p * panel_height
        left, right, top, bottom = 52, 10, top0 + 34, top0 + panel_height - 40
        dr.text((left, top0 + 6), title, fill=(0, 0, 0))
        series = list(dict.fromkeys(s for _, vals in bars for s in vals))
        vmax = max([v for _, vals in bars for v in vals.values() if v is not None] + [0.0])
        vmax = 1.0 if vmax <= 1.0 else float(vmax)
        dr.line([left, top, left, bottom], fill=(0, 0, 0))
        dr.line([left, bottom, width - right, bottom], fill=(0, 0, 0))
        for i in range(5):
            y = bottom - (bottom - top) * i / 4
            dr.line([left - 3, y, width - right, y], fill=(225, 225, 225) if i else (0, 0, 0))
            dr.text((4, y - 6), f"{vmax * i / 4:.3g}", fill=(60, 60, 60))
        for j, s in enumerate(series):
            x = left + 8 + 110 * j
            dr.rectangle([x, top0 + 20, x + 10, top0 + 30], fill=PALETTE[j % len(PALETTE)])
            dr.text((x + 14, top0 + 19), s, fill=(0, 0, 0))
        if not bars:
            continue
        slot = (width - right - left) / len(bars)
        bw = max(2.0, slot * 0.8 / max(len(series), 1))
        for k, (label, vals) in enumerate(bars):
            x0 = left + k * slot + slot * 0.1
            for j, s in enumerate(series):
                v = vals.get(s)
                if v is None:
                    continue
                h = (bottom - top) * max(0.0, float(v)) / vmax
                dr.rectangle([x0 + j * bw, bottom - h, x0 + (j + 1) * bw - 1, bottom], fill=PALETTE[j % len(PALETTE)])
            dr.text((x0, bottom + 6), label[: max(3, int(slot / 6))], fill=(0, 0, 0))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def time_parts(stats: Mapping, steps: int) -> dict:
    """Per-picture costs measured in a run (cold pictures only): `step_s`, the sampling time per
    picture per step (at the run's batch size, classifier-free guidance included), and `judge_s` per
    judge per picture. A run that generated or judged nothing (a warm cache) measures nothing."""
    gen = stats.get("generated", 0)
    return {"step_s": stats.get("generate_s", 0.0) / (gen * steps) if gen else None,
            "judge_s": {j: s / n for j, s in stats.get("judge_s_by", {}).items()
                        if (n := stats.get("judged_by", {}).get(j))}}


def projected_seconds(parts: Mapping, prompts: int, samples: int, steps: int, models: int = 2) -> float | None:
    """T = prompts × samples × models × (steps × step_s + Σ_judges judge_s): the time a run of that
    size takes at the measured rates with a cold cache (`models`: the original and the edited, plus one
    per attack on the prompts it covers). The red-team attacks' own optimisation comes on top."""
    if parts.get("step_s") is None:
        return None
    return prompts * samples * models * (steps * parts["step_s"] + sum(parts.get("judge_s", {}).values()))


def formula_text(parts: Mapping, steps: int) -> str:
    if parts.get("step_s") is None:
        return "nothing was generated (warm cache): no rate measured"
    judges = " + ".join(f"{v:.4g} s ({k})" for k, v in parts.get("judge_s", {}).items()) or "0"
    return (f"T = prompts × samples × models × (steps × {parts['step_s']:.4g} s + {judges}); at {steps} steps "
            f"one picture costs {steps * parts['step_s'] + sum(parts.get('judge_s', {}).values()):.4g} s")
