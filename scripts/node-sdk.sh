#!/usr/bin/env bash
# Installs the real Node SDKs of OpenAI, Anthropic and Google (npm) for the end-to-end test that
# drives them through Candela in reverse mode (tests/e2e/test_node_sdks.py), once.
# Usage: scripts/node-sdk.sh [DIR]   (default: .node-sdk at the repository root)
# Idempotent: a stamp file records the installed set; delete it (or DIR) to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.node-sdk}"
# pinned to the newest majors that run on Node 20 (openai 7 and @google/genai 3 need Node >= 22);
# a new version is a new review of the test
PKGS=("openai@6.49.0" "@anthropic-ai/sdk@1.17.0" "@google/genai@2.32.0")
STAMP="$DIR/.candela-stamp"
WANT="${PKGS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -d "$DIR/node_modules/@google/genai" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "node-sdk: npm is missing (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DIR"
echo "node-sdk: installing ${PKGS[*]} into $DIR"
npm install --prefix "$DIR" --no-audit --no-fund --silent --save-exact "${PKGS[@]}"
(cd "$DIR" && node --input-type=module -e '
  const m = ["openai", "@anthropic-ai/sdk", "@google/genai"];
  for (const n of m) await import(n);
  console.log("node-sdk: imports ok on node " + process.version);
')
printf '%s' "$WANT" > "$STAMP"
