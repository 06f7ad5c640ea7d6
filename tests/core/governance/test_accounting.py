"""What a forwarded request is charged, and how the amount was found (usage_source)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from candela_mitm.config import parse_config
from candela_mitm.context import RequestContext
from candela_mitm.governance.accounting import USAGE_SOURCES, account, charge, provider_refused
from candela_mitm.governance.ledger import Reservation
from candela_mitm.observability.spans import TraceContext
from candela_mitm.providers.forwarding import ForwardPlan, plan_chat_completion
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import resolve_all
from candela_mitm.providers.streaming import ResponseProcessor
from candela_mitm.providers.usage import Usage


# $1 per input token, $10 per output token: costs read as token counts
def cost_of(u: Usage) -> float:
    return u.input_tokens * 1.0 + u.output_tokens * 10.0


RESERVED = 500.0  # the reservation: e.g. 100 input + 40 output tokens at most
SENT = 100  # the input Candela estimates it sent


@pytest.mark.parametrize(
    ("usage", "reported", "failed", "status", "observed", "tokens", "usd", "source"),
    [
        # the answer reported its whole usage and ended: that, even below the reservation
        pytest.param(Usage(90, 5), True, False, 200, 7, (90, 5), 140.0, "reported", id="reported"),
        pytest.param(
            Usage(90, 50), True, False, 200, 7, (90, 50), 590.0, "reported", id="reported-over"
        ),
        # a 200 without usage (a queued job, an unknown shape): the reservation
        pytest.param(Usage(), False, False, 200, 0, (SENT, 0), RESERVED, "reserved", id="no-usage"),
        # the client left mid-stream: what passed, or the reservation if that is more
        pytest.param(Usage(), False, True, 200, 20, (SENT, 20), RESERVED, "reserved", id="cut-early"),
        pytest.param(
            Usage(), False, True, 200, 60, (SENT, 60), 700.0, "observed", id="cut-late-observed"
        ),
        # Anthropic cut after message_start: its input count, the output that passed
        pytest.param(
            Usage(2000, 1, 1800), False, True, 200, 30, (2000, 30), 2300.0, "observed",
            id="anthropic-after-message_start",
        ),
        # a stream that reported a usage, then was cut: never below what was reported
        pytest.param(
            Usage(90, 45), True, True, 200, 3, (90, 45), 540.0, "observed", id="reported-then-cut"
        ),
        # no answer at all after forwarding (upstream cut or Candela's own timeout)
        pytest.param(Usage(), False, True, None, 0, (SENT, 0), RESERVED, "reserved", id="no-answer"),
        pytest.param(Usage(), False, True, 504, 0, (SENT, 0), RESERVED, "reserved", id="timeout"),
        # a provider's error answer: it did not run the request, nothing is charged
        pytest.param(Usage(), False, False, 400, 0, (0, 0), 0.0, None, id="400"),
        pytest.param(Usage(), False, False, 429, 0, (0, 0), 0.0, None, id="429"),
        pytest.param(Usage(), False, False, 500, 0, (0, 0), 0.0, None, id="500"),
        pytest.param(Usage(), False, False, 529, 0, (0, 0), 0.0, None, id="529-overloaded"),
        pytest.param(Usage(), False, True, 503, 0, (0, 0), 0.0, None, id="503-then-cut"),
        # ... unless it says the request timed out past the edge: it may have run
        pytest.param(Usage(), False, False, 504, 0, (SENT, 0), RESERVED, "reserved", id="504"),
        pytest.param(Usage(), False, False, 408, 0, (SENT, 0), RESERVED, "reserved", id="408"),
        # an error answer that carries a usage was billed that
        pytest.param(Usage(80, 2), True, False, 400, 0, (80, 2), 100.0, "reported", id="400-usage"),
    ],
)
def test_charge(
    usage: Usage,
    reported: bool,
    failed: bool,
    status: int | None,
    observed: int,
    tokens: tuple[int, int],
    usd: float,
    source: str | None,
) -> None:
    got_usage, got_usd, got_source = charge(
        usage=usage,
        reported=reported,
        failed=failed,
        status=status,
        observed_output=observed,
        input_estimate=lambda: SENT,
        reserved_usd=RESERVED,
        cost_of=cost_of,
    )
    assert (got_usage.input_tokens, got_usage.output_tokens) == tokens
    assert got_usd == usd
    assert got_source == source
    assert got_source is None or got_source in USAGE_SOURCES


def test_charged_never_below_the_reservation_unless_reported_or_refused() -> None:
    for observed in range(0, 200, 7):
        for failed in (True, False):
            _, usd, source = charge(
                usage=Usage(),
                reported=False,
                failed=failed,
                status=200,
                observed_output=observed,
                input_estimate=lambda: SENT,
                reserved_usd=RESERVED,
                cost_of=cost_of,
            )
            assert usd == max(RESERVED, SENT + 10.0 * observed)
            assert source == ("observed" if usd > RESERVED else "reserved")


@pytest.mark.parametrize(
    ("status", "refused"),
    [(None, False), (200, False), (400, True), (401, True), (404, True), (408, False),
     (429, True), (500, True), (502, True), (503, True), (504, False), (529, True)],
)
def test_provider_refused(status: int | None, refused: bool) -> None:
    assert provider_refused(status) is refused


# -- account(): a request context, as the addons leave it --------------------------------------


class _Answer(ResponseProcessor):
    def __init__(self, usage: Usage, reported: bool, observed: int = 0) -> None:
        self._usage, self._reported, self._observed = usage, reported, observed

    def feed(self, data: bytes) -> bytes:
        return data

    @property
    def usage(self) -> Usage:
        return self._usage

    @property
    def reported(self) -> bool:
        return self._reported

    @property
    def observed_output(self) -> int:
        return self._observed


PRICING = PricingTable.from_config(parse_config({}))
MINI = PRICING.get("gpt-4o-mini")
HELD = 0.01


def context(answer: _Answer | None, *, reserved: bool = True, forwarded: bool = True) -> RequestContext:
    plan = plan_chat_completion(
        resolve_all(parse_config({})), "openai", {"model": "gpt-4o-mini", "messages": []}
    )
    assert isinstance(plan, ForwardPlan)
    c = RequestContext(kind="chat", provider=None, rest="", trace=TraceContext("0" * 32, None))
    c.plan, c.forwarded, c.processor, c.status_code = plan, forwarded, answer, 200
    c.body = {"model": "gpt-4o-mini", "messages": []}
    if reserved:
        at = datetime(2026, 5, 17, tzinfo=UTC)
        c.reservation = Reservation("r", "u", None, HELD, "2026-05-17", "s", "o", at, HELD)
    return c


def test_account_reported() -> None:
    c = context(_Answer(Usage(1000, 100), True))
    account(c, PRICING)
    assert MINI is not None
    assert (c.usage_source, c.cost_usd) == ("reported", MINI.cost(Usage(1000, 100)))


def test_account_without_usage_charges_the_reservation() -> None:
    c = context(_Answer(Usage(), False, observed=3))
    account(c, PRICING)
    assert (c.usage_source, c.cost_usd, c.usage.output_tokens) == ("reserved", HELD, 3)
    assert c.usage.input_tokens > 0  # what Candela sent, estimated from the body


def test_account_cut_stream_charges_what_passed_above_the_reservation() -> None:
    c = context(_Answer(Usage(), False, observed=100_000))
    c.error = "Client disconnected."
    account(c, PRICING)
    assert MINI is not None
    assert c.usage_source == "observed" and c.cost_usd > HELD
    assert c.cost_usd == MINI.cost(c.usage) and c.usage.output_tokens == 100_000


@pytest.mark.parametrize(
    "case", ["not forwarded", "never reached", "nothing reserved", "refused by the provider"]
)
def test_account_charges_nothing(case: str) -> None:
    c = context(_Answer(Usage(), False, observed=50), forwarded=case != "not forwarded",
                reserved=case != "nothing reserved")
    c.upstream_unreached = case == "never reached"
    if case == "refused by the provider":
        c.status_code = 503
    account(c, PRICING)
    assert c.cost_usd == 0.0 and c.usage_source is None
