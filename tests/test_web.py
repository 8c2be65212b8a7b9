"""The web view (web/conceptedit.js) in a real headless Chromium against a real ComfyUI server.

The test starts ComfyUI's own `main.py` (tests/comfy_server.py: the copy the tests run against,
ComfyUI 0.3.75 under run.sh) on 127.0.0.1 with this pack in a temporary custom_nodes folder, once per
front end: the one ComfyUI pins (`comfyui-frontend-package` 1.32.9, requirements-dev.txt) and the
newest on PyPI (resolved when run.sh sets up, in <venv>/frontend-newest, served with
`--front-end-root`). On each it opens the page twice in one Chromium, driven over the Chrome DevTools
protocol (websocket-client): with the classic canvas-drawn nodes and with Nodes 2.0 (the setting
`Comfy.VueNodes.Enabled`: nodes drawn as DOM by Vue). In each case it loads
example_workflows/load_shared_edit.json, queues the prompt through ComfyUI's HTTP API and checks that
the Edit Info node drew its heat map (DOM, canvas pixels, the same colours in a screenshot of the
page, saved in the test's tmp dir), that the concept preset dropdown works, and that the console
holds no error from the extension. Skips when Chromium or websocket-client is not installed, and the
newest front end's cases when run.sh has not installed it.
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.request

import pytest
import torch

import comfy_server
from comfy_server import PACK_DIR_NAME, http, wait_for

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit

ROOT = comfy_server.ROOT
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(comfy_server.chromium_binary() is None,
                                reason="Chromium is not installed (apt-get install chromium)")

# (front end, Nodes 2.0): the front end the server pins and the newest one, each with both node renderers
CASES = [("pinned", False), ("pinned", True), ("newest", False), ("newest", True)]
CASE_IDS = ["pinned-classic", "pinned-nodes2", "newest-classic", "newest-nodes2"]
VUE_NODES = "Comfy.VueNodes.Enabled"


def _view_edit() -> Edit:
    """A tiny-layout edit with a mask on one FFN (pruned fraction 0.5) and a dense K change."""
    fam = arch.get_family("tiny")
    shapes = fam.expected_shapes()
    kf = fam.ffn_out_keys()[1]
    n = shapes[kf][0] * shapes[kf][1]
    return Edit("concept_prune", "tiny", {
        kf: Change("mask", shapes[kf], {"index": torch.arange(0, n // 2)}),
        fam.ffn_out_keys()[3]: Change("mask", shapes[kf], {"index": torch.arange(0, n // 8)}),
    }, concepts=["circle", "<b>not html</b>"], fingerprint={"family": "tiny", "layout": "0123abcd", "weights": "feedbeef"},
        metrics={"pruned_fraction_ffn": 0.125, "seconds": 3.5})


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = comfy_server.Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One server at a time, per front end: started on first use, stopped when the next one starts."""
    running: dict[str, comfy_server.Server] = {}

    def get(front_end: str) -> tuple[comfy_server.Server, str]:
        if front_end == "newest":
            newest = comfy_server.newest_front_end()
            if newest is None:
                pytest.skip(f"the newest comfyui-frontend-package is not installed in {comfy_server.NEWEST_FRONT_END} "
                            "(bash run.sh installs it when it sets up the environment)")
            version, root = newest
        else:
            version, root = comfy_server.pinned_front_end(), None
            if version is None:
                pytest.skip("comfyui-frontend-package is not installed (requirements-dev.txt)")
        if front_end not in running:
            for other in list(running):
                comfy_server.stop(running.pop(other).proc)
            srv = comfy_server.start(tmp_path_factory.mktemp(f"comfy-server-{front_end}"), front_end_root=root)
            running[front_end] = srv
            _view_edit().save(os.path.join(srv.dirs["concept_edits"], "shared_edit.safetensors"))
            # served once: a second copy of the script (another web folder name) fails to register in the page
            ours = [e for e in srv.get("/extensions") if e.endswith("/conceptedit.js")]
            assert ours == [f"/extensions/{PACK_DIR_NAME}/conceptedit.js"], ours
        return running[front_end], version

    yield get
    for srv in running.values():
        comfy_server.stop(srv.proc)


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def page(request, servers, browser):
    front_end, vue = request.param
    srv, version = servers(front_end)
    # the page reads the user's settings from the server (GET /settings) when it starts: set them first.
    # TutorialCompleted: a first visit opens the template browser over the graph, a returning user's does not
    srv.post("/settings/Comfy.TutorialCompleted", True)
    srv.post(f"/settings/{VUE_NODES}", vue)
    assert srv.get("/settings")[VUE_NODES] is vue
    cdp = browser.open_comfy(srv.url)
    seen = cdp.js("({version: window.__COMFYUI_FRONTEND_VERSION__,"
                  f" vue: app.ui.settings.getSettingValue('{VUE_NODES}')}})")
    assert seen == {"version": version, "vue": vue}, seen
    cdp.case = {"front_end": front_end, "version": version, "nodes2": vue, "url": srv.url, "log": srv.log}
    return cdp


def test_every_example_workflow_has_the_thumbnail_the_template_browser_shows(servers):
    """The template browser lists GET /workflow_templates (a pack's example_workflows/*.json) and shows
    /api/workflow_templates/<pack folder>/<name>.jpg for each (both front ends, read off their code);
    scripts/workflow_thumbnails.py draws them."""
    from PIL import Image, ImageStat
    srv, _ = servers("pinned")
    shipped = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "example_workflows")) if f.endswith(".json"))
    assert sorted(srv.get("/workflow_templates")[PACK_DIR_NAME]) == shipped
    for name in shipped:
        with urllib.request.urlopen(f"{srv.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg", timeout=10) as r:
            body, kind = r.read(), r.headers.get("Content-Type")
        assert kind == "image/jpeg", (name, kind)
        img = Image.open(io.BytesIO(body))
        assert img.format == "JPEG" and img.size == (512, 384) and len(body) < 80_000, (name, img.size, len(body))
        # a picture of a graph, not an empty canvas (its grid alone: a spread of about 3 grey levels)
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
        assert spread > 8, f"{name}.jpg looks empty (grey-level spread {spread:.1f})"


def _load_shared_edit_workflow(page) -> tuple[dict, int]:
    with open(os.path.join(ROOT, "example_workflows", "load_shared_edit.json")) as f:
        workflow = json.load(f)
    for node in workflow["nodes"]:  # the edit the server fixture saved
        if node["type"] == "ConceptEditLoadEdit":
            node["widgets_values"] = ["shared_edit.safetensors"]
    page.js(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    return workflow, next(n["id"] for n in workflow["nodes"] if n["type"] == "ConceptEditEditInfo")


def test_edit_info_heatmap_renders_from_a_queued_prompt(page, tmp_path):
    case = page.case
    workflow, info_id = _load_shared_edit_workflow(page)
    # which renderer drew the nodes: Nodes 2.0 puts one DOM element per node in the page, the classic
    # renderer none (the setting reached the page, and the page acted on it)
    dom_nodes = wait_for("the nodes on the page", lambda: page.js(
        "app.graph.nodes.length && [document.querySelectorAll('[data-node-id]').length]"), 30)[0]
    assert (dom_nodes == len(workflow["nodes"])) if case["nodes2"] else dom_nodes == 0, (dom_nodes, case)
    prompt = page.js("app.graphToPrompt().then(p => p.output)")  # the API prompt the front end itself makes
    # keep only what the Edit Info node needs (the rest of the workflow samples, which is slow on a CPU)
    keep = comfy_server.only_what(prompt, info_id)
    assert {n["class_type"] for n in keep.values()} == {"ConceptEditLoadEdit", "ConceptEditEditInfo"}
    # ComfyUI sends a node's "executed" message only to the client that queued the prompt: use the page's id
    client_id = wait_for("the page's client id (given when its websocket opens)", lambda: page.js(
        "import('/scripts/api.js').then(m => m.api.clientId || sessionStorage.getItem('clientId'))"), 30)
    queued = http(case["url"] + "/prompt", {"prompt": keep, "client_id": client_id})
    assert not queued.get("node_errors"), queued
    wait_for(f"the Edit Info node's view ({case})", lambda: page.js(
        "!!document.querySelector('canvas.conceptedit-heatmap[data-drawn=\"1\"]')"), 90, log=case["log"])
    # the node alone in view at 100 %: Nodes 2.0 draws a far-out node as a bare box (no widgets)
    page.js(f"""(() => {{ const n = app.graph.getNodeById({info_id});
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [120 - n.pos[0], 140 - n.pos[1]];
        app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); return true; }})()""")
    time.sleep(0.8)
    dom = page.js("""(() => {
        const c = document.querySelector('canvas.conceptedit-heatmap');
        const root = c.closest('.conceptedit-view');
        const ctx = c.getContext('2d');
        const d = c.dataset, cw = +d.cellW, ch = +d.cellH, ox = +d.originX, oy = +d.originY;
        const px = (r, col) => Array.from(ctx.getImageData(ox + col * cw + 3, oy + r * ch + 1, 1, 1).data);
        const rect = c.getBoundingClientRect();
        return {rows: +d.rows, cols: +d.cols, chips: [...root.querySelectorAll('.ce-chip')].map(e => e.textContent),
                html_in_chip: !!root.querySelector('.ce-chip b'), text: root.textContent,
                rect: [rect.left, rect.top, rect.width, rect.height], copies: document.querySelectorAll('canvas.conceptedit-heatmap').length,
                visible: rect.width > 0 && rect.height > 0 && getComputedStyle(root).display !== 'none'
                         && getComputedStyle(root).visibility !== 'hidden',
                pruned: px(1, 0), eighth: px(3, 0), untouched: px(0, 0),
                widgets_values: app.graph.getNodeById(%d).serialize().widgets_values || []};
    })()""" % info_id)
    fam = arch.get_family("tiny")
    assert dom["copies"] == 1, dom
    assert dom["rows"] == len(fam.blocks) and dom["cols"] == 1
    assert dom["chips"] == ["circle", "<b>not html</b>"] and not dom["html_in_chip"]
    assert "0123abcd" in dom["text"] and "pruned_fraction_ffn" in dom["text"] and "concept_prune" in dom["text"]
    assert dom["visible"], dom
    # the most-pruned layer is the brightest colour of the ramp, a less pruned one darker, an untouched one grey
    assert dom["pruned"][:3] == [240, 249, 33], dom
    assert sum(dom["eighth"][:3]) < sum(dom["pruned"][:3]) and dom["eighth"][:3] != [40, 40, 44], dom
    assert dom["untouched"][:3] == [40, 40, 44], dom
    # what the screen shows, not only what the canvas holds: the cells in a screenshot of the page
    # have the ramp's colours (a view hidden behind the graph canvas, or not laid out, fails here)
    cells = page.js("""(() => {
        const c = document.querySelector('canvas.conceptedit-heatmap'), d = c.dataset, r = c.getBoundingClientRect();
        const sx = r.width / c.width, sy = r.height / c.height, dpr = window.devicePixelRatio || 1;
        const at = (row, col) => [Math.round((r.left + (+d.originX + col * +d.cellW + +d.cellW / 2) * sx) * dpr),
                                  Math.round((r.top + (+d.originY + row * +d.cellH + +d.cellH / 2) * sy) * dpr)];
        return {pruned: at(1, 0), eighth: at(3, 0), untouched: at(0, 0)}; })()""")
    page.js("(() => { document.querySelectorAll('.p-dialog-mask .p-dialog-close-button, .p-dialog-header-close')"
            ".forEach(b => b.click()); return true; })()")  # nothing may cover the graph in the screenshot
    time.sleep(0.3)
    path = page.screenshot(str(tmp_path / "edit_info.png"))
    print(f"screenshot: {path}")
    from PIL import Image
    img = Image.open(path).convert("RGB")
    for name, (x, y) in cells.items():
        got, want = img.getpixel((x, y)), dom[name][:3]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 8, \
            f"{name} cell at {x},{y} on screen {got}, canvas {want} ({case['front_end']} {case['version']}, " \
            f"Nodes 2.0 {case['nodes2']}: {path})"
    # the node fits the view and keeps its size while the canvas redraws (a view that measures the
    # space the front end gave it, rather than its content, grows the node at every frame)
    size = f"""(() => {{ const n = app.graph.getNodeById({info_id}); app.graph.setDirtyCanvas(true, true);
        app.canvas.draw(true, true); const v = document.querySelector('.conceptedit-view');
        const c = v.querySelector('canvas.conceptedit-heatmap').getBoundingClientRect(), top = v.getBoundingClientRect().top;
        const el = document.querySelector('[data-node-id="{info_id}"]'), r = el && el.getBoundingClientRect();
        return {{node: [n.size[0], n.size[1]], content: Math.round(c.bottom - top + v.scrollTop),
                box: r ? [r.left, r.top, r.width, r.height] : null}};
        }})()"""
    first = page.js(size)
    for _ in range(10):
        page.js("new Promise(r => requestAnimationFrame(() => r(true)))")
    time.sleep(1)
    later = page.js(size)
    assert later["node"] == first["node"], f"the Edit Info node keeps growing: {first} then {later} ({case})"
    assert first["node"][1] <= first["content"] + 120, f"the Edit Info node is far taller than its view: {first} ({case})"
    if case["nodes2"]:  # Nodes 2.0 lays the DOM node out itself: its box holds the heat map
        box = first["box"]
        assert box is not None, "Nodes 2.0: no DOM element for the Edit Info node"
        l, t, w, h = dom["rect"]
        assert box[0] <= l + 1 and box[1] <= t + 1 and l + w <= box[0] + box[2] + 1 and t + h <= box[1] + box[3] + 1, \
            f"Nodes 2.0: the heat map {dom['rect']} lies outside its node {box}"
    assert not page.extension_errors(), page.extension_errors()


def test_concept_preset_dropdown_fills_the_list_and_stays_out_of_the_prompt(page):
    node_type = page.js("""(() => {
        const all = Object.entries(LiteGraph.registered_node_types).filter(([k, v]) =>
            k.startsWith('ConceptEdit') && v.nodeData?.input?.required?.concepts?.[1]?.multiline);
        const plain = all.filter(([k, v]) => !String(v.nodeData.input.required.concepts[1].default).includes('->'));
        return (plain[0] || all[0] || [null])[0]; })()""")
    if node_type is None:
        pytest.skip("no ConceptEdit node with a 'concepts' list is registered yet")
    out = page.js("""(async () => {
        app.graph.clear();
        const n = LiteGraph.createNode(%s);
        app.graph.add(n);
        const w = n.widgets.find(w => w.name === 'concept preset');
        const before = n.widgets.find(w => w.name === 'concepts').value;
        w.callback('tiny model: shapes');
        const p = await app.graphToPrompt();
        return {values: w.options.values, before, after: n.widgets.find(w => w.name === 'concepts').value,
                reset: w.value, inputs: Object.keys(p.output[String(n.id)].inputs)};
    })()""" % json.dumps(node_type))
    assert "tiny model: shapes" in out["values"]
    shapes = ["circle", "square", "triangle", "cross", "star", "heart"]
    arrows = "->" in out["before"]
    assert out["after"] == "\n".join(f"{c} ->" if arrows else c for c in shapes) and out["after"] != out["before"]
    assert out["reset"].startswith("(") and "concept preset" not in out["inputs"] and "concepts" in out["inputs"]


def test_the_page_loads_the_extension_without_errors(page):
    """Console errors or uncaught exceptions from conceptedit.js (registering, drawing, the preset
    dropdown), checked after the other tests of this case drove the page."""
    page.js("new Promise(r => setTimeout(() => r(true), 500))")
    assert not page.extension_errors(), page.extension_errors()
