"""`candela prices [MODEL]` (issue 18)."""

from __future__ import annotations

import json

import pytest

from candela_mitm.cli.main import local_main
from candela_mitm.cli.prices import EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE
from candela_mitm.providers import prices_source


def run(capsys, *argv):
    code = local_main(["prices", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_model_per_token_kind_with_its_source(capsys):
    code, out, _ = run(capsys, "claude-opus-4-8", "--json")
    assert code == EXIT_OK
    d = json.loads(out)
    assert d["source"] == prices_source.label() and d["library_provider"] == "anthropic"
    kinds = {k["kind"]: (k["usd"], k["unit"]) for k in d["kinds"]}
    assert kinds["input_tokens"] == (5.0, "per 1M")
    assert kinds["output_tokens"] == (25.0, "per 1M")
    assert kinds["cache_read_tokens"] == (0.5, "per 1M")
    assert kinds["cache_write_tokens"] == (6.25, "per 1M")
    assert kinds["cache_write_1h_tokens"] == (10.0, "per 1M")
    assert kinds["web_searches"] == (10.0, "per 1K")


def test_tiers_and_service_tiers_are_shown(capsys):
    code, out, _ = run(capsys, "gpt-5.4", "--route", "openai")
    assert code == EXIT_OK
    assert "5 above 272,000 input tokens" in out
    assert "service_tier priority: input 5, output 30" in out


def test_a_route_picks_its_price_list(capsys):
    code, out, _ = run(capsys, "us.anthropic.claude-opus-4-8-v1:0", "--route",
                       "anthropic-bedrock", "--json")
    assert code == EXIT_OK
    d = json.loads(out)
    assert d["model"] == "regional.anthropic.claude-opus-4-8-v1:0" and d["library_provider"] == "aws"
    assert {k["kind"]: k["usd"] for k in d["kinds"]}["input_tokens"] == 5.5


def test_config_prices_show_config_as_source(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "pricing:\n"
        "  claude-opus-4-8: {input: 4.0, output: 20.0}\n"
        "  acme-private-1: {input: 1.0, output: 2.0, provider: openai}\n"
    )
    code, out, _ = run(capsys, "claude-opus-4-8", "--config", str(cfg), "--json")
    d = json.loads(out)
    assert code == EXIT_OK and d["source"] == f"{prices_source.label()} + config"
    assert {k["kind"]: k["usd"] for k in d["kinds"]}["input_tokens"] == 4.0
    code, out, _ = run(capsys, "--config", str(cfg), "--json")
    models = {m["model"]: m for m in json.loads(out)["models"]}
    assert models["acme-private-1"]["source"] == "config"
    assert models["claude-opus-4-8"]["input"] == 4.0
    assert models["gpt-4o"]["source"] == prices_source.label()


def test_an_unknown_model_says_how_to_price_it(capsys):
    code, _, err = run(capsys, "mystery-model")
    assert code == EXIT_UNKNOWN and "pricing:" in err


@pytest.mark.parametrize("text", ["pricing:\n  m: {input: -1, output: 1}\n", "nope: ["])
def test_a_bad_config_is_refused(capsys, tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run(capsys, "--config", str(cfg))
    assert code == EXIT_USAGE and err.startswith("candela prices:")
