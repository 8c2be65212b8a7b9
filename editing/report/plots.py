"""Loss and metric plots as ComfyUI IMAGE tensors ([1, H, W, 3], float in [0, 1]), drawn with PIL
(which every ComfyUI install has) so the pack needs no plotting library."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207))


def line_plot(series: Mapping[str, Sequence[float | None] | Sequence[tuple[float, float]]], *, title: str = "",
              xlabel: str = "step", width: int = 640, height: int = 360, smooth: int = 0,
              hlines: Mapping[str, float] | None = None) -> torch.Tensor:
    """Plot named series. A series is a list of y values (x = index; None/NaN gaps are skipped) or of
    (x, y) pairs. `smooth` > 1 adds a running mean (the raw curve stays, faded). `hlines` draws
    labelled dashed horizontal reference lines."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (255, 255, 255))
    dr = ImageDraw.Draw(img)
    left, right, top, bottom = 58, 12, 26 if title else 10, 34
    pts: dict[str, list[tuple[float, float]]] = {}
    for name, ys in series.items():
        xy = []
        for i, v in enumerate(ys):
            x, y = (v if isinstance(v, (tuple, list)) else (i, v))
            if y is not None and math.isfinite(float(y)):
                xy.append((float(x), float(y)))
        pts[name] = xy
    allx = [x for xy in pts.values() for x, _ in xy] or [0.0, 1.0]
    ally = [y for xy in pts.values() for _, y in xy] + list((hlines or {}).values()) or [0.0, 1.0]
    x0, x1 = min(allx), max(allx)
    y0, y1 = min(ally), max(ally)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    W, H = width - left - right, height - top - bottom

    def to_px(x, y):
        return left + (x - x0) / (x1 - x0) * W, top + (1 - (y - y0) / (y1 - y0)) * H

    dr.rectangle([left, top, left + W, top + H], outline=(0, 0, 0))
    for i in range(5):  # y grid and tick labels
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        dr.line([left, py, left + W, py], fill=(230, 230, 230))
        dr.text((4, py - 6), f"{yv:.3g}", fill=(60, 60, 60))
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        dr.text((px - 8, top + H + 4), f"{xv:.0f}" if abs(x1 - x0) >= 4 else f"{xv:.2g}", fill=(60, 60, 60))
    dr.text((left + W // 2 - 12, height - 14), xlabel, fill=(60, 60, 60))
    if title:
        dr.text((left, 6), title, fill=(0, 0, 0))
    for j, (name, val) in enumerate((hlines or {}).items()):
        col = (120, 120, 120)
        _, py = to_px(x0, val)
        for sx in range(int(left), int(left + W), 10):
            dr.line([sx, py, min(sx + 5, left + W), py], fill=col)
        dr.text((left + W - 7 * len(name) - 4, py - 12), name, fill=col)
    for j, (name, xy) in enumerate(pts.items()):
        col = PALETTE[j % len(PALETTE)]
        if smooth > 1 and len(xy) > smooth:
            faded = tuple(int(c + (255 - c) * 0.65) for c in col)
            _poly(dr, [to_px(x, y) for x, y in xy], faded)
            ys = np.convolve([y for _, y in xy], np.ones(smooth) / smooth, mode="valid")
            xy = list(zip([x for x, _ in xy][smooth - 1:], ys))
        _poly(dr, [to_px(x, y) for x, y in xy], col)
        dr.rectangle([left + 8, top + 6 + 14 * j, left + 18, top + 14 + 14 * j], fill=col)
        dr.text((left + 22, top + 4 + 14 * j), name, fill=(0, 0, 0))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def _poly(dr, px, col):
    if len(px) == 1:
        x, y = px[0]
        dr.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    elif px:
        dr.line(px, fill=col, width=2)
        for x, y in px if len(px) <= 12 else ():
            dr.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)


def history_plot(history: Mapping[str, Sequence], title: str = "") -> torch.Tensor:
    """The loss history of an unlearning / distillation run (Edit.metrics["history"])."""
    series = {k: v for k, v in history.items() if k != "dot" and any(x is not None for x in v)}
    n = max((len(v) for v in series.values()), default=0)
    return line_plot(series, title=title, smooth=max(1, n // 20))


def audit_plot(report) -> torch.Tensor:
    """Presence after k benign steps, with the original's and the edited model's presence as references."""
    series = {"presence after benign fine-tuning": [(0, report.presence_edited)] + list(zip(report.steps, report.presence_after))}
    return line_plot(series, title=f"Resurgence audit: {report.method}", xlabel="benign fine-tuning steps",
                     hlines={"original": report.presence_original, "edited": report.presence_edited})
