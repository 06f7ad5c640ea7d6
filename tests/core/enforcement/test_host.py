from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from candela_mitm.config import Config
from candela_mitm.enforcement import host as enforce
from candela_mitm.enforcement.host import (
    CHAIN,
    EnforceState,
    HostChain,
    parse_hosts,
    provider_names,
    resolve_providers,
    restore_text,
    split_families,
)
from candela_mitm.enforcement.iptables import Iptables


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10.9.0.1 api.openai.com\n", {"api.openai.com": ["10.9.0.1"]}),
        ("10.9.0.1 API.OpenAI.com. alias  # comment\n",
         {"api.openai.com": ["10.9.0.1"], "alias": ["10.9.0.1"]}),
        ("10.9.0.1 a\n10.9.0.2 a\n10.9.0.1 a\n", {"a": ["10.9.0.1", "10.9.0.2"]}),
        ("2001:db8::7 a\n", {"a": ["2001:db8::7"]}),
        ("# only a comment\nnot-an-ip a\n10.9.0.1\n\n", {}),
    ],
)  # fmt: skip
def test_parse_hosts(text: str, expected: dict[str, list[str]]) -> None:
    assert parse_hosts(text) == expected


def test_provider_names_merge_defaults_config_and_flags() -> None:
    names = provider_names(["API.OpenAI.com", "llm.internal."], ["extra.example"])
    assert names[: len(enforce.DEFAULT_PROVIDER_HOSTS)] == list(enforce.DEFAULT_PROVIDER_HOSTS)
    assert names.count("api.openai.com") == 1
    assert names[-2:] == ["llm.internal", "extra.example"]
    assert provider_names(["a"], [], defaults=False) == ["a"]


def test_resolve_prefers_the_hosts_file() -> None:
    asked: list[str] = []

    def resolver(name: str) -> list[str]:
        asked.append(name)
        return ["192.0.2.9"] if name == "b" else []

    got = resolve_providers(["a", "b", "c"], hosts={"a": ["10.0.0.1"]}, resolver=resolver)
    assert got == {"a": ["10.0.0.1"], "b": ["192.0.2.9"], "c": []}
    assert asked == ["b", "c"]


def test_split_families_sorts_and_dedupes() -> None:
    v4, v6 = split_families({"a": ["10.0.0.2", "2001:db8::1"], "b": ["10.0.0.10", "10.0.0.2"]})
    assert v4 == ["10.0.0.2", "10.0.0.10"] and v6 == ["2001:db8::1"]


def test_restore_text_redirects_all_https_and_plain_http_to_providers() -> None:
    assert restore_text(["10.0.0.1", "10.0.0.2"], 8443, "/candela-proxy") == (
        "*nat\n"
        f":{CHAIN} - [0:0]\n"
        f'-A {CHAIN} -m cgroup --path "/candela-proxy" -j RETURN\n'
        f"-A {CHAIN} -p tcp -m multiport --dports 443 -j REDIRECT --to-ports 8443\n"
        f"-A {CHAIN} -d 10.0.0.1/32 -p tcp -m multiport --dports 80 -j REDIRECT --to-ports 8443\n"
        f"-A {CHAIN} -d 10.0.0.2/32 -p tcp -m multiport --dports 80 -j REDIRECT --to-ports 8443\n"
        "COMMIT\n"
    )


@pytest.mark.parametrize("scope", [None, "/"])
def test_restore_text_without_a_scope_enforces_every_process(scope: str | None) -> None:
    assert "!" not in restore_text(["10.0.0.1"], 8443, "/candela-proxy", scope)


def test_restore_text_with_a_scope_leaves_other_processes_alone() -> None:
    lines = restore_text(["10.0.0.1"], 8443, "/candela-proxy", "/ci.slice/job-7").splitlines()
    # Candela first, then everything outside the scope: neither reaches a REDIRECT
    assert lines[2:4] == [
        f'-A {CHAIN} -m cgroup --path "/candela-proxy" -j RETURN',
        f'-A {CHAIN} -m cgroup ! --path "/ci.slice/job-7" -j RETURN',
    ]
    assert all("REDIRECT" in line for line in lines[4:-1])


def test_the_scope_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ci.slice").mkdir()
    assert enforce.enforced_scope(None, tmp_path) is None
    assert enforce.enforced_scope("/", tmp_path) is None
    assert enforce.enforced_scope("/ci.slice", tmp_path) == tmp_path / "ci.slice"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        enforce.enforced_scope("/nobody-here", tmp_path)


@pytest.mark.parametrize(
    "value, ok",
    [(None, True), ("/ci.slice", True), ("/a/b-c", True), ("ci.slice", False), ("/a/../b", False)],
)
def test_config_enforce_scope_is_a_cgroup_path(value: str | None, ok: bool) -> None:
    config = {"interception": {"enforce_scope": value}}
    if ok:
        assert Config.model_validate(config).interception.enforce_scope == value
    else:
        with pytest.raises(ValueError, match="interception.enforce_scope"):
            Config.model_validate(config)


class FakeIptables:
    """Records commands; `fail` holds argument tuples that exit non-zero (each once per entry)."""

    def __init__(self, fail: Sequence[tuple[str, ...]] = ()):
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = list(fail)

    def __call__(self, args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(args), stdin))
        key = tuple(args[4:]) if args[:4] == ["iptables", "-w", "-t", "nat"] else tuple(args)
        code = 0
        if key in self.fail:
            self.fail.remove(key)
            code = 1
        return subprocess.CompletedProcess(list(args), code, "", "boom" if code else "")


def test_apply_adds_the_jump_only_when_missing() -> None:
    run = FakeIptables(fail=[("-C", "OUTPUT", "-j", CHAIN)])
    HostChain(Iptables(runner=run)).apply("TEXT")
    assert [c[0] for c in run.calls] == [
        ["iptables-restore", "-w", "--noflush"],
        ["iptables", "-w", "-t", "nat", "-C", "OUTPUT", "-j", CHAIN],
        ["iptables", "-w", "-t", "nat", "-I", "OUTPUT", "1", "-j", CHAIN],
    ]
    assert run.calls[0][1] == "TEXT"
    run = FakeIptables()
    HostChain(Iptables(runner=run)).apply("TEXT")
    assert len(run.calls) == 2  # the jump was there already


def test_apply_failure_is_an_oserror() -> None:
    run = FakeIptables(fail=[("iptables-restore", "-w", "--noflush")])
    with pytest.raises(OSError, match="boom"):
        HostChain(Iptables(runner=run)).apply("TEXT")


def test_remove_drops_every_jump_then_the_chain() -> None:
    d = ("-D", "OUTPUT", "-j", CHAIN)

    class Jumps(FakeIptables):
        left = 2

        def __call__(
            self, args: Sequence[str], stdin: str | None
        ) -> subprocess.CompletedProcess[str]:
            if tuple(args[4:]) == d:
                self.calls.append((list(args), stdin))
                self.left -= 1
                return subprocess.CompletedProcess(list(args), 0 if self.left >= 0 else 1, "", "")
            return super().__call__(args, stdin)

    run = Jumps()
    assert HostChain(Iptables(runner=run)).remove()
    ops = [tuple(c[0][4:]) for c in run.calls]
    assert ops == [d, d, d, ("-F", CHAIN), ("-X", CHAIN)]
    assert not HostChain(Iptables(runner=FakeIptables(fail=[d, ("-F", CHAIN)]))).remove()


def test_rules_reads_the_chain() -> None:
    class Listing(FakeIptables):
        def __call__(
            self, args: Sequence[str], stdin: str | None
        ) -> subprocess.CompletedProcess[str]:
            out = f"-N {CHAIN}\n-A {CHAIN} -j RETURN\n"
            return subprocess.CompletedProcess(list(args), 0, out, "")

    assert HostChain(Iptables(runner=Listing())).rules() == [f"-A {CHAIN} -j RETURN"]
    assert HostChain(Iptables(runner=FakeIptables(fail=[("-S", CHAIN)]))).rules() is None


def test_state_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "enforce.json")
    state = EnforceState(8443, "/sys/fs/cgroup/candela-proxy", {"a": ["10.0.0.1"]}, [1, 2], 5.0)
    state.save(path)
    assert EnforceState.load(path) == state
    Path(path).write_text("{not json")
    assert EnforceState.load(path) is None
    Path(path).write_text('{"unexpected": 1}')
    assert EnforceState.load(path) is None
    assert EnforceState.load(str(tmp_path / "missing.json")) is None


def test_join_without_enforcement_does_nothing(tmp_path: Path) -> None:
    assert enforce.join(state_path=str(tmp_path / "none.json")) is None


# -- the proxy's side: --enforce host and the refusal feed --------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, "needs transparent mode"),
        ({"mode": "reverse", "interception": {"enforce": "host"}}, "needs transparent mode"),
        ({"mode": "transparent", "interception": {"listen_port": 0}}, "fixed interception"),
    ],
)
def test_enable_for_proxy_refuses_what_cannot_be_enforced(
    config: dict[str, object], expected: str
) -> None:
    from candela_mitm.config import Config
    from candela_mitm.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        enforce.enable_for_proxy(Config.model_validate(config))


@pytest.mark.parametrize(
    "argv, yaml_text",
    [
        (["--enforce", "host"], ""),
        ([], "interception: {enforce: host}\n"),
        (["--enforce", "host", "--mode", "reverse"], "mode: transparent\n"),
    ],
)
def test_server_with_enforce_host_in_reverse_mode_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], yaml_text: str
) -> None:
    from candela_mitm.cli import main as cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert cli.server_main(["--config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err
    assert "enforce host needs transparent mode" in err


def test_config_enforce_is_none_or_host() -> None:
    from candela_mitm.config import Config

    assert Config().interception.enforce == "none"
    host = Config.model_validate({"interception": {"enforce": "host"}})
    assert host.interception.enforce == "host"
    with pytest.raises(ValueError):
        Config.model_validate({"interception": {"enforce": "everything"}})


def test_joined_needs_enforcement_and_the_cgroup(tmp_path: Path) -> None:
    state = str(tmp_path / "enforce.json")
    assert not enforce.joined(state_path=state)
    EnforceState(8443, "/nonexistent/cgroup/candela-proxy", {}, [], 0.0).save(state)
    assert not enforce.joined(state_path=state)


class FakePinnedEvents:
    """host.PinnedEvents over a shared list: poll takes what is there."""

    queue: list[object] = []
    opened = 0

    def __init__(self, pin_dir: str) -> None:
        FakePinnedEvents.opened += 1

    def poll(self, timeout_ms: int = 100) -> list[object]:
        out, FakePinnedEvents.queue[:] = list(FakePinnedEvents.queue), []
        if not out:
            time.sleep(timeout_ms / 1000)
        return out

    def __enter__(self) -> FakePinnedEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _event(reason: int, tgid: int) -> object:
    from candela_mitm.enforcement.bypass import BypassEvent
    from tests.core.enforcement.test_bypass import raw_event

    return BypassEvent.from_bytes(raw_event(reason=reason, tgid=tgid, comm=b"cdl-probe"))


def _wait(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_refusal_feed_audits_each_event_and_only_one_feed_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from candela_mitm.ebpf import host

    monkeypatch.setattr(host, "PinnedEvents", FakePinnedEvents)
    FakePinnedEvents.queue = []
    recorded: list[tuple[str, dict[str, object]]] = []

    def record(action: str, **fields: object) -> bool:
        recorded.append((action, fields))
        return len(recorded) != 3  # the third entry is refused by the audit queue

    lock = str(tmp_path / "run" / "events.lock")
    first = enforce.RefusalFeed(record, lock_path=lock, poll_ms=10, retry_s=0.02)
    second = enforce.RefusalFeed(record, lock_path=lock, poll_ms=10, retry_s=0.02)
    first.start()
    try:
        assert first.reading.wait(3)
        second.start()
        FakePinnedEvents.queue += [_event(5, 100), _event(2, 101)]
        assert _wait(lambda: len(recorded) == 2)
        assert [(a, f["reason"], f["tgid"], f["comm"], f["enforcement"]) for a, f in recorded] == [
            ("bypass_attempt", "provider_port", 100, "cdl-probe", "host"),
            ("bypass_attempt", "udp_port", 101, "cdl-probe", "host"),
        ]
        assert not second.reading.is_set()  # one consumer of the ring buffer per host
        first.stop()
        assert second.reading.wait(3)  # the waiting one takes over
        FakePinnedEvents.queue += [_event(6, 102), _event(7, 103)]
        assert _wait(lambda: len(recorded) == 4)
        assert (second.recorded, second.lost) == (1, 1)
        assert (first.recorded, first.lost) == (2, 0)
    finally:
        first.stop()
        second.stop()
    assert not second.reading.is_set()
