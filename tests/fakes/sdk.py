"""Real provider SDKs, run as snippets in the second virtual environment (.venv-sdk)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Variables that would point an SDK at a real account or a proxy the test did not choose.
_SCRUBBED = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_CLOUD_LOCATION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_GENAI_API_VERSION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


def sdk_python() -> Path:
    """The interpreter of .venv-sdk (CANDELA_SDK_VENV overrides the folder); made by scripts/sdk-venv.sh."""
    venv = Path(os.environ.get("CANDELA_SDK_VENV") or REPO_ROOT / ".venv-sdk")
    return venv / "bin" / "python"


def sdk_available() -> bool:
    return sdk_python().is_file()


def run_sdk(
    script: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet (dedented) with the SDK interpreter; returns its exit code, stdout, stderr.

    The child gets a clean environment: no provider keys, proxies or CA bundles leak in from the
    test runner; `env` adds what the test wants (e.g. HTTPS_PROXY, SSL_CERT_FILE, AWS_* creds).
    Never raises on a non-zero exit: tests assert on returncode and stderr themselves.
    """
    python = sdk_python()
    if not python.is_file():
        raise FileNotFoundError(f"{python} is missing: run scripts/sdk-venv.sh")
    child_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"
    # botocore reads ~/.aws; point it at nothing so a developer's profile cannot sign test requests
    child_env["AWS_CONFIG_FILE"] = os.devnull
    child_env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    child_env["AWS_EC2_METADATA_DISABLED"] = "true"
    child_env.update(env or {})
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
        env=child_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
