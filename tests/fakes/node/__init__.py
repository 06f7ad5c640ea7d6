"""Real provider SDKs for Node (.node-sdk, made by scripts/node-sdk.sh), run on the scripts beside this file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.fakes.sdk import _SCRUBBED, REPO_ROOT

SCRIPTS = Path(__file__).resolve().parent
PACKAGES = ("openai", "@anthropic-ai/sdk", "@google/genai")


def node_sdk_dir() -> Path:
    """The folder holding node_modules (CANDELA_NODE_SDK overrides it); made by scripts/node-sdk.sh."""
    return Path(os.environ.get("CANDELA_NODE_SDK") or REPO_ROOT / ".node-sdk")


def node_sdk_missing() -> str | None:
    """What is missing to run the Node SDKs, or None."""
    if shutil.which("node") is None:
        return "node is missing (apt-get install nodejs npm)"
    modules = node_sdk_dir() / "node_modules"
    absent = [p for p in PACKAGES if not (modules / p / "package.json").is_file()]
    if absent:
        return f"the Node SDKs {absent} are missing: run scripts/node-sdk.sh (make test does)"
    return None


def run_node(
    script: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run tests/fakes/node/<script> with node; returns its exit code, stdout and stderr.

    The script is fed on stdin with the SDK folder as working directory, so that its bare imports
    ("openai") resolve in .node-sdk/node_modules without a package.json in the tests. The child
    gets the environment run_sdk gives Python snippets: no provider key, base URL or proxy leaks
    in from the test runner; `env` adds what the script reads. Never raises on a non-zero exit.
    """
    child_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    child_env.update(env or {})
    return subprocess.run(
        ["node", "--input-type=module"],
        input=(SCRIPTS / script).read_text(),
        env=child_env,
        cwd=node_sdk_dir(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
