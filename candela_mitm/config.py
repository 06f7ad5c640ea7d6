"""Configuration: the YAML contract of ../shared/spec/config.example.yaml as one frozen model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from candela_mitm.errors import ConfigError

PROVIDER_ROUTES = (
    "openai",
    "google",
    "gemini-oai",
    "anthropic",
    "anthropic-vertex",
    "anthropic-direct",
    "anthropic-bedrock",
    "ollama",
    "lmstudio",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)  # None: 8181 server, 1234 local


class State(_Model):
    backend: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "~/.candela/state.db"
    redis_url: str | None = None
    busy_timeout_ms: int = Field(default=2000, ge=1)  # past this a locked store fails closed

    @model_validator(mode="after")
    def _redis_needs_url(self) -> State:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend: redis needs redis_url")
        return self


class BigQuery(_Model):
    project: str
    dataset: str = "candela"
    table: str = "audit"
    endpoint: str | None = None  # a local fake for tests; None: the public API
    credentials: Literal["adc", "anonymous"] = "adc"


class Audit(_Model):
    sinks: list[Literal["sqlite", "duckdb", "bigquery"]] = ["sqlite"]
    sqlite_path: str = "~/.candela/audit.db"
    duckdb_path: str = "~/.candela/audit.duckdb"
    bigquery: BigQuery | None = None
    batch_max_entries: int = Field(default=512, ge=1)
    batch_max_delay_ms: int = Field(default=50, ge=1)
    queue_max_entries: int = Field(default=100_000, ge=1)
    mirror_backlog_max: int = Field(default=1_000_000, ge=1)
    # refusals of callers with no valid credential: at most this many entries a minute per
    # process (bursts as large); the rest are counted (candela_unauthenticated_total)
    unauthenticated_per_minute: int = Field(default=60, ge=0)
    log_prompts: bool = False

    @model_validator(mode="after")
    def _bigquery_needs_its_section(self) -> Audit:
        if "bigquery" in self.sinks and self.bigquery is None:
            raise ValueError("sink bigquery needs the bigquery: {project, dataset, table} section")
        return self


class Provider(_Model):
    base_url: str | None = None
    api_key_env: str | None = None
    project: str | None = None
    region: str | None = None
    anthropic_version: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    # model-less reads the operator forwards unmetered and audited, e.g. "GET /v1/files/{id}":
    # nothing outside the route's operation catalogue is forwarded otherwise
    allow: list[str] = []

    @field_validator("allow")
    @classmethod
    def _reads_only(cls, v: list[str]) -> list[str]:
        from candela_mitm.providers.catalogue.operation import parse_allowed

        for entry in v:
            parse_allowed(entry)  # ValueError names the entry
        return v


class Oidc(_Model):
    audiences: list[str] = []
    issuers: list[str] = ["https://accounts.google.com"]
    certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"
    # Email domains accepted (a Google Workspace `hd` claim counts too); empty: any domain.
    allowed_domains: list[str] = []


class AccessTokens(_Model):
    tokeninfo_url: str = "https://oauth2.googleapis.com/tokeninfo"
    # OAuth client ids whose tokens are accepted (tokeninfo's aud/azp). Empty: access tokens are
    # refused, since a token issued to any other OAuth client would otherwise pass.
    audiences: list[str] = []
    # The issuer's token shape: only bearers starting with one of these are ever sent to
    # tokeninfo (Google's access tokens start with "ya29."), so a provider key never leaves.
    token_prefixes: list[str] = Field(default=["ya29."], min_length=1)


class ApiKey(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    user: str


class Auth(_Model):
    required: bool | None = None  # None: true for candela-server, false for candela
    oidc: Oidc | None = None
    access_tokens: AccessTokens | None = None
    api_keys: list[ApiKey] = []
    admins: list[str] = []
    # A verified OIDC or access-token identity that is neither configured (users:, admins:,
    # api_keys:) nor created through the admin API is refused (403 user_not_enrolled) unless
    # this is true: otherwise every new identity of a trusted issuer would be a new budget.
    allow_unknown_users: bool = False


class User(_Model):
    role: Literal["admin", "developer"] | None = None
    tenants: list[str] = []
    daily_budget_usd: float | None = Field(default=None, ge=0)
    requests_per_minute: int | None = Field(default=None, ge=0)


class Budgets(_Model):
    default_daily_usd: float = Field(default=10.0, ge=0)
    default_max_output_tokens: int = Field(default=4096, ge=1)


class RateLimits(_Model):
    default_requests_per_minute: int = Field(default=60, ge=0)


class TenantModels(_Model):
    mode: Literal["allowlist", "blocklist"] | None = None
    allowed: list[str] = []
    blocked: list[str] = []


class TenantPolicy(_Model):
    models: TenantModels


class Models(_Model):
    mode: Literal["allowlist", "blocklist"] | None = None  # None: every model allowed
    allowed: list[str] = []
    blocked: list[str] = []
    tenants: dict[str, TenantPolicy] = {}


class Governance(_Model):
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()
    unknown_model_price: Literal["deny", "zero"] = "deny"
    # queued work (Responses background, batches, Assistants runs): refused, or forwarded and
    # charged at its reservation
    async_jobs: Literal["refuse", "reserve"] = "refuse"
    models: Models = Models()


class Price(_Model):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    max_output_tokens: int | None = Field(default=None, ge=1)
    provider: str | None = None
    cache_write: float | None = Field(default=None, ge=0)  # 5-minute cache writes, per million
    cache_write_1h: float | None = Field(default=None, ge=0)  # 1-hour cache writes, per million

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, v: str | None) -> str | None:
        if v is not None and v not in PROVIDER_ROUTES:
            raise ValueError(f"unknown provider route {v!r} (one of {', '.join(PROVIDER_ROUTES)})")
        return v


class Interception(_Model):
    listen_port: int = Field(default=8443, ge=0, le=65535)
    certs_dir: str = "~/.candela/certs"
    hosts: dict[str, str] = {}
    # an intercepted app's own provider key is replaced by the organisation's: everywhere (true),
    # nowhere (false), or on the routes listed
    replace_provider_keys: bool | list[str] = True
    # host: at start the proxy puts `candela enforce host` in place towards its transparent
    # listener (root); it stays when the proxy stops, until `candela enforce off`
    enforce: Literal["none", "host"] = "none"

    @field_validator("hosts")
    @classmethod
    def _known_routes(cls, v: dict[str, str]) -> dict[str, str]:
        for host, route in v.items():
            if route not in PROVIDER_ROUTES:
                raise ValueError(f"host {host!r} maps to unknown provider route {route!r}")
        return v


class Limits(_Model):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # a request head, line to blank line
    # a connection's first request head must be whole this long after it opens ...
    header_timeout_s: float = Field(default=20.0, gt=0)
    # ... a kept-alive connection's next one this long after the previous response ...
    idle_timeout_s: float = Field(default=60.0, gt=0)
    # ... and a request body this long after its head
    body_timeout_s: float = Field(default=60.0, gt=0)
    max_connections_per_client: int = Field(default=256, ge=1)  # open at once, per address
    upstream_timeout_s: float = Field(default=300.0, gt=0)  # until the response headers arrive
    connect_timeout_s: float = Field(default=10.0, gt=0)


class Local(_Model):
    runtime: Literal["ollama", "lmstudio"] = "ollama"
    runtime_command: list[str] = ["ollama", "serve"]
    cache_ttl_s: int = Field(default=3600, ge=0)
    gemini_cache_price_multiplier: float = Field(default=0.25, ge=0)
    # Local users (uids) besides Candela's own and root whose programs may use `candela`.
    allowed_uids: list[int] = []


class Config(_Model):
    listen: Listen = Listen()
    mode: Literal["reverse", "transparent"] = "reverse"
    workers: int = Field(default=1, ge=1, le=64)
    state: State = State()
    audit: Audit = Audit()
    providers: dict[str, Provider] = {}
    auth: Auth = Auth()
    users: dict[str, User] = {}
    governance: Governance = Governance()
    pricing: dict[str, Price] = {}
    interception: Interception = Interception()
    limits: Limits = Limits()
    local: Local = Local()

    @field_validator("providers")
    @classmethod
    def _known_routes(cls, v: dict[str, Provider]) -> dict[str, Provider]:
        for name in v:
            if name not in PROVIDER_ROUTES:
                raise ValueError(
                    f"unknown provider route {name!r} (one of {', '.join(PROVIDER_ROUTES)})"
                )
        return v


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("function-after", "function-before")]
    return ".".join(parts) or "(top level)"


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate already-parsed YAML data; errors name the source, the key path and the reason."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _format_loc(err["loc"])
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown key"
            lines.append(f"{source}: {loc}: {reason}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a config file; None means the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return parse_config(data, str(p))
