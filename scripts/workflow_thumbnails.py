"""Draw the thumbnail that ComfyUI's template browser shows for each example workflow.

The browser lists a pack's example_workflows/<name>.json under "Extensions" and shows
example_workflows/<name>.jpg beside it (the front end asks the server for
/api/workflow_templates/<pack folder>/<name>.jpg; ComfyUI serves that folder as it is). This script
starts ComfyUI's own server (tests/comfy_server.py: ComfyUI 0.3.75 and the front end it pins) with
this pack, loads each workflow into the real page in headless Chromium, fits the graph into the
window, takes a screenshot of it and writes a 512 × 384 JPEG next to the workflow. The workflows are
read, never changed.

    bash run.sh py scripts/workflow_thumbnails.py            # every workflow
    bash run.sh py scripts/workflow_thumbnails.py NAME ...   # only these (file names without .json)

Automatic1111 imports every file in scripts/ (this pack's extension entry lives here too): this one
does nothing on import.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "example_workflows")
SIZE = (512, 384)  # the browser's cards crop to their own shape: keep the graph in the middle
WINDOW = (1600, 1200)
MARGIN = 24  # screen pixels of empty canvas around the graph
# the page's settings for a clean picture: no minimap, node text drawn at any zoom, no first-visit
# template dialog over the graph
SETTINGS = {"Comfy.Minimap.Visible": False, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.05,
            "Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False}


# everything but the graph: menus, tabs, banners, toasts, the run button (visibility, unlike display,
# keeps the layout; the nodes' DOM widgets, e.g. text boxes, stay visible)
ONLY_THE_GRAPH = ("body * { visibility: hidden !important; } "
                  "#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }")


def fit_and_shoot(page, workflow: dict, path: str) -> None:
    page.js(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    time.sleep(1.5)  # the page restores the workflow's own view and places the DOM widgets on later frames
    # the graph's bounds (nodes with their titles, groups) fitted into the window
    fit = """(() => {
        const T = LiteGraph.NODE_TITLE_HEIGHT, c = app.canvas.canvas.getBoundingClientRect();
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
        for (const n of app.graph.nodes) add(n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T);
        for (const g of app.graph.groups || []) add(g.pos[0], g.pos[1], g.size[0], g.size[1]);
        const free = {x: c.left + 40, y: c.top + 40, w: c.width - 80, h: c.height - 80};
        const s = Math.min(free.w / (x1 - x0), free.h / (y1 - y0), 1.2);
        const w = (x1 - x0) * s, h = (y1 - y0) * s;
        const left = free.x + (free.w - w) / 2, top = free.y + (free.h - h) / 2;
        app.canvas.ds.scale = s;
        app.canvas.ds.offset = [(left - c.left) / s - x0, (top - c.top) / s - y0];
        app.canvas.deselectAll?.();
        app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
        return {x: left, y: top, width: w, height: h, scale: s};
    })()"""
    rect = page.js(fit)
    time.sleep(0.8)
    again = page.js(fit)  # the same view: nothing moved it meanwhile
    if again != rect:
        raise RuntimeError(f"the page changed the view while fitting it: {rect} then {again}")
    time.sleep(1.0)
    shot = path + ".png"
    # the graph's box and a margin around it, widened to the thumbnail's shape
    x, y, w, h = rect["x"] - MARGIN, rect["y"] - MARGIN, rect["width"] + 2 * MARGIN, rect["height"] + 2 * MARGIN
    aspect = SIZE[0] / SIZE[1]
    if w / h < aspect:
        x, w = x - (h * aspect - w) / 2, h * aspect
    else:
        y, h = y - (w / aspect - h) / 2, w / aspect
    page.screenshot(shot, x=x, y=y, width=w, height=h)
    from PIL import Image
    img = Image.open(shot).convert("RGB").resize(SIZE, Image.LANCZOS)
    img.save(path, "JPEG", quality=82, optimize=True, progressive=True)
    os.remove(shot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (default: every example_workflows/*.json)")
    args = ap.parse_args(argv)
    names = args.names or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(WORKFLOWS, "*.json")))
    missing = [n for n in names if not os.path.isfile(os.path.join(WORKFLOWS, n + ".json"))]
    if missing:
        print(f"no such workflow in example_workflows/: {', '.join(missing)}", file=sys.stderr)
        return 2
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # _pack, and tests/comfy_server.py
    import _pack
    _pack.load()
    import comfy_server
    if comfy_server.chromium_binary() is None:
        print("Chromium is not installed: apt-get install chromium (or set CHROMIUM to a Chrome binary)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="conceptedit-thumbnails-") as tmp:
        print("starting ComfyUI ...", flush=True)
        srv = comfy_server.start(os.path.join(tmp, "server"))
        browser = None
        try:
            for key, value in SETTINGS.items():
                srv.post(f"/settings/{key}", value)
            browser = comfy_server.Browser(os.path.join(tmp, "profile"), size=WINDOW)
            page = browser.open_comfy(srv.url)
            page.js(f"(() => {{ const s = document.createElement('style'); s.textContent = {json.dumps(ONLY_THE_GRAPH)};"
                    " document.head.appendChild(s); return true; })()")
            for i, name in enumerate(names):
                with open(os.path.join(WORKFLOWS, name + ".json")) as f:
                    workflow = json.load(f)
                out = os.path.join(WORKFLOWS, name + ".jpg")
                fit_and_shoot(page, workflow, out)
                print(f"[{i + 1}/{len(names)}] {os.path.relpath(out, ROOT)} ({os.path.getsize(out) // 1024} KB)", flush=True)
        finally:
            if browser is not None:
                browser.close()
            comfy_server.stop(srv.proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
