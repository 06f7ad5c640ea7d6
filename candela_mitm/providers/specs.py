"""Providers: each route name's wire format, credential kind and upstream base URL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from candela_mitm.config import Config, Provider

Wire = Literal["openai", "gemini", "anthropic", "bedrock", "ollama"]
AuthKind = Literal["bearer_key", "anthropic_key", "google_adc", "sigv4", "none"]


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    wire: Wire  # the format the upstream speaks
    auth: AuthKind
    default_base_url: str | None  # None: derived from project and region
    default_key_env: str | None = None
    local: bool = False  # a local runtime: costs nothing
    translates_openai: bool = False  # clients speak OpenAI, the upstream speaks `wire`
    signing_service: str = "bedrock"  # sigv4: the service name in the credential scope


SPECS: dict[str, ProviderSpec] = {
    s.name: s
    for s in (
        ProviderSpec("openai", "openai", "bearer_key", "https://api.openai.com", "OPENAI_API_KEY"),
        ProviderSpec("google", "gemini", "google_adc", "https://generativelanguage.googleapis.com"),
        ProviderSpec(
            "gemini-oai",
            "openai",
            "google_adc",
            "https://generativelanguage.googleapis.com/v1beta/openai",
        ),
        ProviderSpec("anthropic", "anthropic", "google_adc", None, translates_openai=True),
        ProviderSpec("anthropic-vertex", "anthropic", "google_adc", None),
        ProviderSpec(
            "anthropic-direct",
            "anthropic",
            "anthropic_key",
            "https://api.anthropic.com",
            "ANTHROPIC_API_KEY",
        ),
        ProviderSpec("anthropic-bedrock", "bedrock", "sigv4", None),
        # Bedrock's OpenAI-compatible endpoint (Mantle): chat completions and responses on
        # bedrock-mantle.<region>.api.aws, signed for the `bedrock-mantle` service
        ProviderSpec("bedrock-mantle", "openai", "sigv4", None, signing_service="bedrock-mantle"),
        ProviderSpec("ollama", "ollama", "none", "http://127.0.0.1:11434", local=True),
        ProviderSpec("lmstudio", "openai", "none", "http://127.0.0.1:1235", local=True),
    )
}

DEFAULT_VERTEX_REGION = "us-east5"
DEFAULT_BEDROCK_REGION = "us-east-1"
ANTHROPIC_VERSION = "2023-06-01"
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"


@dataclass(frozen=True)
class Upstream:
    """Where one provider route's requests go, resolved from config once at start."""

    spec: ProviderSpec
    scheme: str
    host: str
    port: int
    base_path: str  # prefix joined before the rest of the client's path ("" or "/v1beta/openai")
    api_key_env: str | None
    project: str | None
    region: str | None
    anthropic_version: str
    timeout_s: float | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}{path}"


def _vertex_base(region: str) -> str:
    if region == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def resolve_upstream(spec: ProviderSpec, cfg: Provider | None) -> Upstream:
    cfg = cfg or Provider()
    region = cfg.region
    if spec.auth == "google_adc" and spec.wire == "anthropic":
        region = region or DEFAULT_VERTEX_REGION
        base = cfg.base_url or _vertex_base(region)
    elif spec.wire == "bedrock":
        region = region or DEFAULT_BEDROCK_REGION
        base = cfg.base_url or f"https://bedrock-runtime.{region}.amazonaws.com"
    elif spec.name == "bedrock-mantle":
        region = region or DEFAULT_BEDROCK_REGION
        base = cfg.base_url or f"https://bedrock-mantle.{region}.api.aws"
    else:
        base = cfg.base_url or spec.default_base_url or ""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"provider {spec.name}: base_url {base!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    version = cfg.anthropic_version or (
        VERTEX_ANTHROPIC_VERSION
        if spec.auth == "google_adc"
        else BEDROCK_ANTHROPIC_VERSION
        if spec.wire == "bedrock"
        else ANTHROPIC_VERSION
    )
    return Upstream(
        spec=spec,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        api_key_env=cfg.api_key_env or spec.default_key_env,
        project=cfg.project,
        region=region,
        anthropic_version=version,
        timeout_s=cfg.timeout_s,
    )


def resolve_all(config: Config) -> dict[str, Upstream]:
    return {
        name: resolve_upstream(spec, config.providers.get(name)) for name, spec in SPECS.items()
    }
