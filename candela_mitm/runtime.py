"""Runtime: everything built once from the config at start and handed to every addon."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from typing import Any, Literal

from candela_mitm.config import Config
from candela_mitm.credentials import UpstreamCredentials
from candela_mitm.forwarding import route_for_model
from candela_mitm.identity import Authenticator
from candela_mitm.policy import ModelPolicy
from candela_mitm.pricing import PricingTable
from candela_mitm.providers import Upstream, resolve_all
from candela_mitm.spans import SpanStore

Command = Literal["server", "local"]


@dataclass
class Runtime:
    config: Config
    command: Command
    upstreams: dict[str, Upstream]
    pricing: PricingTable
    policy: ModelPolicy
    spans: SpanStore
    credentials: UpstreamCredentials
    auth_required: bool
    authenticator: Authenticator
    local_user: str
    local_models: dict[str, str] = field(default_factory=dict)  # model -> ollama | lmstudio
    extras: dict[str, Any] = field(default_factory=dict)

    def tenants_of(self, user: str) -> list[str]:
        u = self.config.users.get(user)
        return list(u.tenants) if u else []

    def provider_for_model(self, model: str) -> str | None:
        return route_for_model(
            model,
            self.pricing,
            self.local_models,
            vertex_configured=bool(
                self.config.providers.get("anthropic")
                and self.config.providers["anthropic"].project
            ),
        )


def build_runtime(config: Config, command: Command) -> Runtime:
    upstreams = resolve_all(config)
    required = config.auth.required if config.auth.required is not None else command == "server"
    local_user = getpass.getuser()
    return Runtime(
        config=config,
        command=command,
        upstreams=upstreams,
        pricing=PricingTable.from_config(config),
        policy=ModelPolicy(config.governance.models),
        spans=SpanStore(),
        credentials=UpstreamCredentials(upstreams),
        auth_required=required,
        authenticator=Authenticator(
            config.auth,
            required,
            local_user=local_user,
            role_override=lambda user: config.users[user].role if user in config.users else None,
        ),
        local_user=local_user,
    )
