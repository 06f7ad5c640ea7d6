"""addons/connlimits.py: the per-address connection cap and a request's deadlines."""

from __future__ import annotations

import json
import time

from mitmproxy import connection
from mitmproxy.test import tflow

from candela_mitm import errors
from candela_mitm.addons import connlimits
from candela_mitm.addons.connlimits import ConnLimits, Deadline, expired, raw_denial

from .conftest import BASE

LIMITS = {"max_connections_per_client": 2, "header_timeout_s": 1, "idle_timeout_s": 5,
          "body_timeout_s": 2}


def client(host: str = "10.0.0.1", port: int = 1000) -> connection.Client:
    return connection.Client(peername=(host, port), sockname=("0.0.0.0", 8181), timestamp_start=0)


def addon(runtime) -> ConnLimits:
    return ConnLimits(runtime({**BASE, "limits": LIMITS}))


def test_the_cap_is_per_address_and_freed_on_disconnect(runtime, monkeypatch):
    closed: list[tuple[str, bytes | None]] = []
    monkeypatch.setattr(connlimits.mitm_patches, "close_client",
                        lambda c, raw: closed.append((c.id, raw)) or True)
    a = addon(runtime)
    first, second, third = client(port=1), client(port=2), client(port=3)
    for c in (first, second):
        a.client_connected(c)
        assert c.error is None
    a.client_connected(third)
    assert third.error and [cid for cid, _ in closed] == [third.id]
    raw = closed[0][1]
    assert raw is not None and raw.startswith(b"HTTP/1.1 429 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
    other = client(host="10.0.0.2")
    a.client_connected(other)  # another address has its own count
    assert other.error is None
    a.client_disconnected(third)  # refused: it was never counted
    a.client_disconnected(first)
    again = client(port=4)
    a.client_connected(again)
    assert again.error is None and a.open["10.0.0.1"] == 2


def test_deadlines_follow_the_request(runtime):
    a = addon(runtime)
    f = tflow.tflow()
    a.client_connected(f.client_conn)
    cid = f.client_conn.id
    assert a.deadlines[cid].what == "head" and a.deadlines[cid].seconds == 1
    f.request.timestamp_end = None
    a.requestheaders(f)
    assert a.deadlines[cid].what == "body" and a.deadlines[cid].seconds == 2
    assert not connlimits.arrived(a.deadlines[cid])
    f.request.timestamp_end = time.time()  # the body is whole: no deadline counts any more
    assert connlimits.arrived(a.deadlines[cid])
    a.response(f)
    assert a.deadlines[cid].what == "next head" and a.deadlines[cid].seconds == 5


def test_a_connection_with_a_request_under_way_keeps_no_deadline(runtime):
    """HTTP/2: one stream answered while another is still streaming."""
    a = addon(runtime)
    one = tflow.tflow()
    two = tflow.tflow()
    two.client_conn = one.client_conn
    a.client_connected(one.client_conn)
    for f in (one, two):
        a.requestheaders(f)
    a.response(one)
    d = a.deadlines[one.client_conn.id]
    assert d.what == "body" and connlimits.arrived(d)  # two's body is whole: it is being forwarded
    a.error(two)
    assert a.deadlines[one.client_conn.id].what == "next head"


def test_sweep_answers_408_to_a_waiting_request_and_closes_idle_ones_silently(runtime, monkeypatch):
    closed: dict[str, bytes | None] = {}
    monkeypatch.setattr(connlimits.mitm_patches, "close_client",
                        lambda c, raw: closed.setdefault(c.id, raw) is None or True)
    a = addon(runtime)
    slow, idle, busy = client(port=1), client(port=2), tflow.tflow()
    for c in (slow, idle, busy.client_conn):
        a.client_connected(c)
    a.deadlines[idle.id] = Deadline(0, "next head", 5)
    a.requestheaders(busy)  # tflow's request is whole (timestamp_end set): being forwarded
    a.sweep(time.monotonic() + 2.5)
    assert set(closed) == {slow.id, idle.id}
    assert closed[idle.id] is None
    assert json.loads((closed[slow.id] or b"").partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert a.deadlines == {}


def test_expired_and_raw_denial():
    d = {"a": Deadline(1.0, "head", 1), "b": Deadline(3.0, "body", 1)}
    assert expired(d, 2.0) == ["a"]
    raw = raw_denial(errors.request_header_too_large(100))
    assert raw.startswith(b"HTTP/1.1 431 ") and b"connection: close" in raw.lower()


def test_a_relayed_connection_has_no_deadline_and_leaves_the_count(runtime):
    """Host enforcement relays every HTTPS connection of the machine through the transparent
    listener; one Sni lets through untouched is not bounded like Candela's own clients."""
    from mitmproxy.proxy import context
    from mitmproxy.test import taddons
    from mitmproxy.tls import ClientHello, ClientHelloData

    a = addon(runtime)
    relayed, governed = client(port=1), client(port=2)
    for c in (relayed, governed):
        a.client_connected(c)
    hello = ClientHello(bytes.fromhex("0303" + "00" * 32 + "00" + "0002c02f" + "0100"))
    for c, ignored in ((relayed, True), (governed, False)):
        data = ClientHelloData(context.Context(c, taddons.context().options), hello)
        data.ignore_connection = ignored
        a.tls_clienthello(data)
    assert relayed.id not in a.deadlines and governed.id in a.deadlines
    assert a.open["10.0.0.1"] == 1
    third = client(port=3)
    a.client_connected(third)  # the cap (2) counts the governed connection only
    assert third.error is None
    a.client_disconnected(relayed)  # already released: counted once
    assert a.open["10.0.0.1"] == 2


def test_requests_under_way_counts_every_request_from_its_head_to_its_end(runtime):
    """Audit commits an entry on the event loop only when its request is alone (at most one
    under way): the count covers every connection, counted by the cap or not (a transparent
    one), and forgets a flow dropped without an answer or an error."""
    import gc

    a = addon(runtime)
    first, second, third = tflow.tflow(), tflow.tflow(), tflow.tflow()
    a.client_connected(first.client_conn)  # second and third: connections the cap never saw
    assert a.requests_under_way() == 0
    for f in (first, second, third):
        a.requestheaders(f)
    assert a.requests_under_way() == 3
    a.response(first)
    a.error(second)
    assert a.requests_under_way() == 1
    a.response(first)  # twice: no harm
    assert a.requests_under_way() == 1
    del third, f  # the loop variable held it too
    gc.collect()
    assert a.requests_under_way() == 0
