#!/usr/bin/env bash
# Installs what `make bench` needs, once: the harness venv (.venv-bench: uvloop for the fake
# upstream and the load generator, py-spy and pyinstrument for profiles) and LiteLLM's proxy in its
# own venv (.venv-litellm), from PyPI. Idempotent: stamp files record what was installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

venv() {  # venv DIR STAMP_TEXT PACKAGES...
  local dir="$1" want="$2"
  shift 2
  local stamp="$dir/.candela-bench-stamp"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
    return 0
  fi
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  echo "bench: installing $* into $dir"
  "$dir/bin/python" -m pip install -q "$@"
  printf '%s' "$want" > "$stamp"
}

venv "$ROOT/.venv-bench" "uvloop py-spy pyinstrument" uvloop py-spy pyinstrument
venv "$ROOT/.venv-litellm" "litellm[proxy]" 'litellm[proxy]'
"$ROOT/.venv-litellm/bin/python" -c 'import importlib.metadata as m; print("bench: litellm", m.version("litellm"))'
