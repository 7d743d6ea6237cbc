# Fresh machine: `make demo` runs the whole paid flow offline; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
# Debian's Chromium for the console's browser tests (Playwright drives it; `playwright install` is never run)
CHROMIUM := /usr/bin/chromium

.PHONY: install demo serve test test-secantus bench font chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt requirements-test.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

font:
	@test -f $(CJK_FONT) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq fonts-wqy-microhei; }

chromium:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

install: $(VENV)/.installed font

# Both run the Procfile's processes (gunicorn, gpu, worker, clock) and the WeChat simulator as separate processes in
# embedded mode: a SecantusDB server and the embedded Redis under INSTANCE_DIR, stopped with them (Ctrl-C).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m miniapp_api.dev.demo --out demo-output

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m miniapp_api.dev.serve --port $(PORT) $(ARGS)

test: install chromium
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

# The DB-touching test files against a SecantusDB server of their own, started before them and stopped after
# (MONGO_URI names it to them; README: "Which tests run against what"). CI runs it after `make test`.
SECANTUS_TESTS := tests/test_mongo_real.py tests/test_flow.py tests/test_money.py tests/test_payments.py \
	tests/test_renders.py tests/test_privacy.py tests/test_sweeper.py tests/test_intake_api.py tests/test_xpay.py

test-secantus: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m miniapp_api.dev.with_database -- \
		$(BIN)/python -m pytest -q --durations=10 $(SECANTUS_TESTS)

bench: install
	@for script in bench/*.py; do echo "== $$script"; HF_HUB_OFFLINE=1 $(BIN)/python $$script || exit 1; done

clean:
	rm -rf demo-output instance
