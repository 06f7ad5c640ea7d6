"""Configuration: the YAML contract of ../shared/spec/config.example.yaml as one frozen model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from candela_mitm.errors import ConfigError

PROVIDER_ROUTES = (
    "openai",
    "google",
    "gemini-oai",
    "anthropic",
    "anthropic-vertex",
    "anthropic-direct",
    "anthropic-bedrock",
    "bedrock-mantle",
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
    # an entry already in the entry journal (durable: audit/journal.py) is chained into the
    # ledger within this (at least batch_max_delay_ms): fewer, larger commits when few come
    journal_chain_delay_ms: int = Field(default=250, ge=1, le=10_000)
    queue_max_entries: int = Field(default=100_000, ge=1)
    mirror_backlog_max: int = Field(default=1_000_000, ge=1)
    # refusals of callers with no valid credential: at most this many entries a minute per
    # process (bursts as large); the rest are counted (candela_unauthenticated_total)
    unauthenticated_per_minute: int = Field(default=60, ge=0)
    log_prompts: bool = False
    # what an entry committed before its answer ends survives: a power cut or kernel crash
    # (power_loss: each commit batch fsynced, the answer waits for the disk), or a crash of
    # Candela's own processes, kill -9 included (process_crash: written to the OS before the
    # answer ends, fsynced by the writer thread at most `sync_interval_ms` after its commit, so
    # a power cut loses at most that much; no disk wait on the request's path)
    durability: Literal["power_loss", "process_crash"] = "process_crash"
    sync_interval_ms: int = Field(default=100, ge=1, le=60_000)

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
    # tenant_admin: manages only its own tenants in the admin API (admin/tenant_scope.py)
    role: Literal["admin", "tenant_admin", "developer"] | None = None
    tenants: list[str] = []
    daily_budget_usd: float | None = Field(default=None, ge=0)  # per budget_period
    requests_per_minute: int | None = Field(default=None, ge=0)
    budget_period: Literal["daily", "weekly", "monthly"] | None = None  # None: budgets.period
    # None: governance.rate_limits' default (itself None: no limit)
    max_concurrent_requests: int | None = Field(default=None, ge=0)
    input_tokens_per_minute: int | None = Field(default=None, ge=0)
    output_tokens_per_minute: int | None = Field(default=None, ge=0)
    total_tokens_per_minute: int | None = Field(default=None, ge=0)


Period = Literal["daily", "weekly", "monthly"]


class BudgetSlices(_Model):
    """Per-process budget slices (governance/slices.py): a budget with ample room is held in
    part by each process and requests' holds are carved from it in memory."""

    enabled: bool = True
    requests: int = Field(default=32, ge=2, le=10_000)  # a slice holds this many requests' holds
    headroom: int = Field(default=8, ge=2, le=1_000)  # never more than what is left / headroom
    # retired slices' spend recorded and the slices returned this often (see record_ms)
    flush_ms: int = Field(default=250, ge=1, le=10_000)
    # an unused slice is returned after this: long enough for a user sending a request every
    # few seconds (the common LLM pattern) to keep its slice across the gaps
    idle_s: float = Field(default=30.0, gt=0, le=3600)
    # the next slice is taken before the one in use runs out, sized to cover demand_ms of the
    # demand seen on it: at least `requests` holds, at most max(requests, max_requests)
    max_requests: int = Field(default=1024, ge=2, le=100_000)
    demand_ms: int = Field(default=1000, ge=10, le=60_000)
    # the spend of a slice in use is recorded this often (a slice retired: at the next flush);
    # the slice holds the money meanwhile: only the spent figure and alerts wait for it
    record_ms: int = Field(default=1000, ge=1, le=60_000)
    # slices a process holds at once, at most (each a reservation in the store, and work for
    # every flush): past it no new slice is taken, and requests reserve on their own
    max_held: int = Field(default=4096, ge=1, le=1_000_000)


class Budgets(_Model):
    default_daily_usd: float = Field(default=10.0, ge=0)  # per period (daily by default)
    default_max_output_tokens: int = Field(default=4096, ge=1)
    slices: BudgetSlices = Field(default_factory=BudgetSlices)
    # The span of every budget that names none (users and tenants), and the time zone every
    # period starts at midnight in (weeks start on Monday, months on the 1st).
    period: Period = "daily"
    time_zone: str = "UTC"

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        if v != "UTC":
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {v!r} (an IANA name such as Europe/Paris)"
                ) from None
        return v


class TenantBudget(_Model):
    """A tenant's budget: every request attributed to the tenant must fit it (and its user's)."""

    budget_usd: float | None = Field(default=None, ge=0)  # None: no tenant budget
    period: Period | None = None  # None: governance.budgets.period
    # tokens per minute every user of the tenant uses together; None: no limit
    input_tokens_per_minute: int | None = Field(default=None, ge=0)
    output_tokens_per_minute: int | None = Field(default=None, ge=0)
    total_tokens_per_minute: int | None = Field(default=None, ge=0)
    # requests in flight at once, by every user of the tenant together; None: no limit
    max_concurrent_requests: int | None = Field(default=None, ge=0)


class RateLimitLeases(_Model):
    """Per-process rate leases (governance/rate_leases.py): a block of a user's requests per
    minute taken at once, requests admitted from it in memory."""

    enabled: bool = True
    requests: int = Field(default=32, ge=2, le=10_000)  # a block holds at most this many
    headroom: int = Field(default=4, ge=2, le=1_000)  # never more than the room / headroom
    # requests are admitted from a block this long; at most 1 s (the Redis window key's TTL)
    lifetime_ms: int = Field(default=1000, ge=10, le=1000)
    # the next block is taken before the one in use runs out, sized to the demand seen on it
    # over a lifetime: at least `requests`, at most max(requests, max_requests)
    max_requests: int = Field(default=1024, ge=2, le=100_000)
    # an idle block: for a user checked in the store twice within this (not within
    # lifetime_ms), a small block stamped this far ahead, sized to the pace seen; 0: none.
    # Its requests count in the window up to this much longer than a minute: at most the
    # window (60,000), and at least lifetime_ms
    idle_lifetime_ms: int = Field(default=30_000, ge=0, le=60_000)

    @model_validator(mode="after")
    def _idle_outlives_a_block(self) -> RateLimitLeases:
        if self.idle_lifetime_ms and self.idle_lifetime_ms < self.lifetime_ms:
            raise ValueError("idle_lifetime_ms is 0 (no idle blocks) or at least lifetime_ms")
        return self


class RateLimits(_Model):
    leases: RateLimitLeases = Field(default_factory=RateLimitLeases)
    default_requests_per_minute: int = Field(default=60, ge=0)
    # None: no limit. Tokens are held from the estimate at admission, corrected at settlement.
    default_max_concurrent_requests: int | None = Field(default=None, ge=0)
    default_input_tokens_per_minute: int | None = Field(default=None, ge=0)
    default_output_tokens_per_minute: int | None = Field(default=None, ge=0)
    default_total_tokens_per_minute: int | None = Field(default=None, ge=0)


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


class WebSocketSessions(_Model):
    """WebSocket sessions (addons/websocket.py): the budget slice and each session's bounds."""

    # held at the upgrade, settled and topped up from the remaining budget at each usage frame
    reserve_usd: float = Field(default=0.05, gt=0)
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1)  # one assembled message
    frames_per_second: int = Field(default=200, ge=1)  # client messages, per session
    idle_timeout_s: float = Field(default=600.0, gt=0)  # no frame either way for this long
    max_sessions_per_user: int = Field(default=8, ge=1)  # open at once, every process counted


class WorkloadRule(_Model):
    """An executable (its path, its SHA-256, or both) -> who its intercepted requests are for,
    and the models it may use. The binary is the one the kernel says runs (workload.py)."""

    exe: str | None = None  # the path as the process's mount namespace names it
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    user: str | None = None  # its requests are this user's (budget, rate limit, audit)
    tenant: str | None = None  # and this tenant's (checked against the user's tenants)
    models: TenantModels | None = None  # besides the user's and tenant's policy, not instead

    @model_validator(mode="after")
    def _names_a_binary(self) -> WorkloadRule:
        if self.exe is None and self.sha256 is None:
            raise ValueError("a workload names its executable: exe, sha256 or both")
        return self


class Governance(_Model):
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()
    unknown_model_price: Literal["deny", "zero"] = "deny"
    # queued work (Responses background, batches, Assistants runs): refused, or forwarded and
    # charged at its reservation
    async_jobs: Literal["refuse", "reserve"] = "refuse"
    models: Models = Models()
    tenants: dict[str, TenantBudget] = {}  # budgets per tenant (admin API changes win)
    websocket: WebSocketSessions = WebSocketSessions()
    # intercepted requests by the executable that sent them, first match wins
    workloads: list[WorkloadRule] = []
    # a candidate configuration judged beside this one on every request, never enforced: its
    # verdicts go into the audit log (governance/shadow.py); a path relative to this file
    shadow: str | None = None


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


_HOST_CHARS = re.compile(r"[a-z0-9*-]+(\.[a-z0-9*-]+)*\Z")


def host_pattern(value: str) -> str:
    """A host name or family pattern, normalised; ValueError saying what is wrong with it.

    `*` stands for one DNS label or part of one (never a dot): `*.api.openai.com`,
    `*-aiplatform.googleapis.com`, `bedrock-mantle.*.api.aws`. The last two labels are literal,
    so a pattern always names one organisation's domain (`*.com` would intercept the world).
    """
    name = value.strip().lower().rstrip(".")
    if not _HOST_CHARS.match(name):
        raise ValueError(
            f"host {value!r}: a host name or pattern is DNS labels of a-z, 0-9, '-' and '*' "
            "joined by dots (no scheme, port or path)"
        )
    labels = name.split(".")
    if "*" in name and (len(labels) < 3 or any("*" in label for label in labels[-2:])):
        raise ValueError(
            f"host {value!r}: a wildcard may stand only left of a literal domain of at least "
            "two labels (e.g. '*.api.openai.com', 'bedrock-mantle.*.api.aws')"
        )
    if "**" in name:
        raise ValueError(f"host {value!r}: '**' is not a pattern ('*' already spans a label)")
    return name


HostPattern = Annotated[str, AfterValidator(host_pattern)]

# The Google front end serves every *.googleapis.com name (Gemini and Vertex among them) and
# Google's other domains from the same addresses: a connection that names one of these in its
# SNI may carry a provider's Host (domain fronting), so it is decrypted and every request's Host
# checked (interception.shared_edges).
DEFAULT_SHARED_EDGES = (
    "*.googleapis.com",
    "*.google.com",
    "*.gstatic.com",
    "*.googleusercontent.com",
    "*.googlevideo.com",
    "*.appspot.com",
    "*.run.app",
    "*.cloudfunctions.net",
    "*.firebaseio.com",
    "*.youtube.com",
    "*.ggpht.com",
)


class Interception(_Model):
    listen_port: int = Field(default=8443, ge=0, le=65535)
    certs_dir: str = "~/.candela/certs"
    # host name or family pattern -> provider route; extends (or overrides) the built-in
    # families of every provider's public hosts (enforcement/interception.py DEFAULT_HOSTS)
    hosts: dict[HostPattern, str] = {}
    # names served from a provider's shared front end: decrypted, each request's Host checked
    # (a provider Host there is domain fronting: refused), everything else forwarded re-encrypted
    shared_edges: list[HostPattern] = list(DEFAULT_SHARED_EDGES)
    # CA bundle that verifies the shared edges' servers when Candela re-encrypts towards them;
    # None: the public roots (certifi)
    upstream_ca_file: str | None = None
    # an intercepted app's own provider key is replaced by the organisation's: everywhere (true),
    # nowhere (false), or on the routes listed
    replace_provider_keys: bool | list[str] = True
    # the organisation's provider keys, as HMAC-SHA256 fingerprints keyed with the secret in
    # $<key_fingerprint_secret_env> (never the keys): where a key is not replaced, any other key
    # is refused (403 foreign_provider_key); every intercepted key's fingerprint is audited
    organisation_keys: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = []
    key_fingerprint_secret_env: str = "CANDELA_KEY_FINGERPRINT_SECRET"
    # host: at start the proxy puts `candela enforce host` in place towards its transparent
    # listener (root); it stays when the proxy stops, until `candela enforce off`
    enforce: Literal["none", "host"] = "none"
    # with enforce: host, the cgroup v2 path (under the v2 root, e.g. /ci.slice) whose processes
    # (and their descendants') are enforced; None: every process of the machine but Candela's
    enforce_scope: str | None = None

    @field_validator("enforce_scope")
    @classmethod
    def _cgroup_path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or ".." in v.split("/") or '"' in v):
            raise ValueError(f"{v!r} is not a cgroup path under the v2 root, like /ci.slice")
        return v

    @field_validator("hosts")
    @classmethod
    def _known_routes(cls, v: dict[str, str]) -> dict[str, str]:
        for host, route in v.items():
            if route not in PROVIDER_ROUTES:
                raise ValueError(f"host {host!r} maps to unknown provider route {route!r}")
        return v

    @field_validator("replace_provider_keys")
    @classmethod
    def _known_key_routes(cls, v: bool | list[str]) -> bool | list[str]:
        for route in v if isinstance(v, list) else ():
            if route not in PROVIDER_ROUTES:
                raise ValueError(f"unknown provider route {route!r}")
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


class Otlp(_Model):
    """OTLP trace export; the standard OTEL_EXPORTER_OTLP_* variables fill what is left unset."""

    endpoint: str | None = None  # as OTEL_EXPORTER_OTLP_ENDPOINT: http/protobuf adds /v1/traces
    protocol: Literal["http/protobuf", "grpc"] | None = None  # None: OTEL_..._PROTOCOL, else http
    headers: dict[str, str] = {}  # sent with every export; {}: OTEL_EXPORTER_OTLP_HEADERS
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # of traces the caller did not decide

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        scheme, _, rest = (v or "").partition("://")
        if v is not None and (scheme not in ("http", "https") or not rest):
            raise ValueError("must be an http:// or https:// URL, e.g. http://otel-collector:4318")
        return v


class Telemetry(_Model):
    otlp: Otlp | None = None  # None: export only when OTEL_EXPORTER_OTLP_ENDPOINT is set


class Webhook(_Model):
    """Where budget alerts are posted: `json` (Candela's own body) or `slack` (an incoming
    webhook's {text, blocks}); `headers` are sent with each post and never logged."""

    url: str
    format: Literal["json", "slack"] = "json"
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"header {name!r}: not a valid HTTP header name")
            if any(ch in value for ch in "\r\n\0"):
                raise ValueError(f"header {name!r}: its value holds a line break or NUL")
        return v


class Alerts(_Model):
    """Budget threshold alerts (governance/alerts.py, observability/alerts.py)."""

    # percent of a budget's amount; each is sent once per scope (user, tenant), id and period
    thresholds: list[Annotated[int, Field(ge=1, le=1000)]] = [50, 80, 90, 100]
    webhooks: list[Webhook] = []  # none: nothing is sent (the utilisation gauge still is kept)
    timeout_s: float = Field(default=5.0, gt=0)  # one post
    max_attempts: int = Field(default=6, ge=1, le=50)  # then the alert is audited as failed
    initial_backoff_s: float = Field(default=1.0, gt=0)  # doubled after each failed attempt ...
    max_backoff_s: float = Field(default=60.0, gt=0)  # ... up to this
    queue_max: int = Field(default=1000, ge=1)  # posts waiting; past it an alert fails at once

    @field_validator("thresholds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("each threshold once")
        return sorted(v)


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
    telemetry: Telemetry = Telemetry()
    alerts: Alerts = Alerts()

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
    if len(parts) >= 2 and parts[-1] == "[key]":  # a mapping's key itself: hosts[*.com]
        return ".".join(parts[:-2]) + f"[{parts[-2]}]"
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
    return resolve_shadow(_read_config(p), p)


def _read_config(p: Path) -> Config:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return parse_config(data, str(p))


def load_shadow_candidate(path: str | os.PathLike[str]) -> Config:
    """A shadow candidate (governance.shadow), validated as a configuration of its own; it may
    not name a shadow itself."""
    candidate = _read_config(Path(path).expanduser())
    if candidate.governance.shadow is not None:
        raise ConfigError(f"{path}: governance.shadow: a shadow candidate cannot name one itself")
    return candidate


def resolve_shadow(config: Config, config_file: Path) -> Config:
    """`governance.shadow` made absolute against the config file's folder, the candidate read
    and validated: a bad one fails the start (or the reload) naming both files and its key."""
    path = config.governance.shadow
    if path is None:
        return config
    absolute = str((config_file.parent / Path(path).expanduser()).resolve())
    try:
        load_shadow_candidate(absolute)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: governance.shadow: {e}") from None
    g = config.governance.model_copy(update={"shadow": absolute})
    return config.model_copy(update={"governance": g})
