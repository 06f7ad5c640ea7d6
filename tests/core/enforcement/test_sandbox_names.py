"""enforcement/sandbox_names.py: a sandbox's hosts file and name resolution (no kernel needed)."""

from candela_mitm.enforcement import sandbox_names as sandbox


def test_provider_hosts_resolve_or_go_to_the_gateway():
    asked = []

    def resolve(names):
        asked.extend(names)
        return {"api.anthropic.com": "198.18.1.1"}

    entries = sandbox.sandbox_hosts(
        [("api.openai.com", "198.18.0.1"), ("other.example", "10.201.0.2")],
        ["api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com"],
        "10.200.0.1",
        resolve,
    )
    assert entries == [
        ("api.openai.com", "198.18.0.1"),  # --add-host wins, and is not looked up
        ("other.example", "10.201.0.2"),
        ("api.anthropic.com", "198.18.1.1"),
        ("generativelanguage.googleapis.com", "10.200.0.1"),
    ]
    assert asked == ["api.anthropic.com", "generativelanguage.googleapis.com"]


def test_the_hosts_file_lists_the_sandboxs_names_before_the_hosts(tmp_path):
    system = tmp_path / "hosts"
    system.write_text("127.0.0.1 localhost\n192.0.2.9 api.openai.com\n")
    text = sandbox.hosts_file([("api.openai.com", "198.18.0.1")], str(system))
    assert text.index("198.18.0.1\tapi.openai.com") < text.index("192.0.2.9 api.openai.com")


def test_resolution_gives_up_on_time():
    assert sandbox.resolve_ipv4([]) == {}
    assert sandbox.resolve_ipv4(["name.invalid"], timeout=2.0) == {}
