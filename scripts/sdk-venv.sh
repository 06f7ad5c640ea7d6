#!/usr/bin/env bash
# Creates the second virtual environment that holds the real provider SDKs, once.
# They cannot share .venv with mitmproxy 11 (it pins h11<=0.14; the SDKs need h11 0.16).
# Usage: scripts/sdk-venv.sh [VENV_DIR]   (default: .venv-sdk at the repository root)
# Idempotent: a stamp file records the installed set; delete it (or the venv) to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-sdk}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
# ranges around the versions the tests were written against (FACTS.md): a new major is a new review
PKGS=("openai>=3.54,<4" "anthropic>=2.12,<3" "google-genai>=3.4,<4" "boto3>=1.40,<2")
STAMP="$VENV/.candela-sdk-stamp"
WANT="${PKGS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "sdk-venv: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "sdk-venv: installing ${PKGS[*]}"
"$VENV/bin/python" -m pip install -q --upgrade "${PKGS[@]}"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("openai", "anthropic", "google-genai", "boto3", "botocore", "h11"):
    print(f"sdk-venv: {name} {md.version(name)}")
PY
printf '%s' "$WANT" > "$STAMP"
