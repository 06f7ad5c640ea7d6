# The README's two commands: `make run` and `make test`. Everything they need is installed here, once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SDK_VENV := .venv-sdk
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GENAI_PRICES := 0.2.5
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: run test install system sdk lint typecheck bench demo clean

# genai-prices (the price data) goes in after the project, without its dependencies: its live
# updater needs httpx2 and h11 >= 0.16, which break mitmproxy 11 (h11 <= 0.14); Candela only
# reads its offline data (candela_mitm/providers/prices_source.py). Not in pyproject's
# dependencies for the same reason. tests/core/providers/test_prices_source.py guards this step.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'genai-prices==$(GENAI_PRICES)'
	touch $@

install: $(STAMP)

# Debian packages for the privileged tests (bcc, kernel headers, iptables, nftables), Redis and
# Chromium; then bcc (a Debian package, not on PyPI) made importable from the project's venv.
system: $(STAMP)
	bash scripts/install-system.sh
	@if [ -d /usr/lib/python3/dist-packages/bcc ]; then ln -sfn /usr/lib/python3/dist-packages/bcc $(SITE)/bcc; fi

# The real provider SDKs live in their own venv: they need an h11 that mitmproxy 11 refuses.
sdk:
	bash scripts/sdk-venv.sh $(SDK_VENV)
	bash scripts/claude-code.sh .claude-code
	bash scripts/node-sdk.sh .node-sdk
	bash scripts/node-ws.sh .node-ws

run: $(STAMP)
	$(VENV)/bin/candela-server $(if $(CONFIG),--config $(CONFIG))

test: system sdk lint
	CANDELA_REQUIRE_PRIVILEGED=1 $(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Benchmarks (issue 7), not part of `make test`: the harness and LiteLLM get venvs of their own
# (bench/setup.sh); results go to bench/results/ and the README's "## Benchmarks" section.
# BENCH_ARGS="--only s1,s2 --quick" runs a part.
bench: $(STAMP)
	bash bench/setup.sh
	.venv-bench/bin/python bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(SDK_VENV) .claude-code *.egg-info
