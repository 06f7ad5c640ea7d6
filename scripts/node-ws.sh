#!/usr/bin/env bash
# Installs the Node `ws` WebSocket client (npm) for the end-to-end test that opens a Realtime
# session through Candela with it, unchanged (tests/e2e/test_websocket.py), once.
# Usage: scripts/node-ws.sh [DIR]   (default: .node-ws at the repository root)
# Idempotent: a stamp file records the installed version; delete it (or DIR) to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.node-ws}"
PKG="ws@8.23.1"
STAMP="$DIR/.candela-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PKG" ] && [ -f "$DIR/node_modules/ws/package.json" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "node-ws: npm is missing (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DIR"
echo "node-ws: installing $PKG into $DIR"
npm install --prefix "$DIR" --no-audit --no-fund --silent "$PKG"
printf '%s' "$PKG" > "$STAMP"
