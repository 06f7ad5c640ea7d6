#!/usr/bin/env bash
# Installs the real Claude Code CLI (npm @anthropic-ai/claude-code) for the end-to-end test that
# runs it through Candela with its default model (tests/e2e/test_claude_code.py), once.
# Usage: scripts/claude-code.sh [DIR]   (default: .claude-code at the repository root)
# Idempotent: a stamp file records the installed version; delete it (or DIR) to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.claude-code}"
# the version the test was written against; its default model must be priced by genai-prices
PKG="@anthropic-ai/claude-code@2.1.332"
STAMP="$DIR/.candela-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PKG" ] && [ -x "$DIR/node_modules/.bin/claude" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "claude-code: npm is missing (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DIR"
echo "claude-code: installing $PKG into $DIR"
npm install --prefix "$DIR" --no-audit --no-fund --silent "$PKG"
"$DIR/node_modules/.bin/claude" --version
printf '%s' "$PKG" > "$STAMP"
