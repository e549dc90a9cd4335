# Every target sets up what it needs itself; `make test` on a fresh clone is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= serve,train,dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
comma := ,
PYTEST_ARGS ?=

.PHONY: test serve bench lint redis browser venv clean container-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-* && touch $@

redis:
	@bash scripts/ensure-redis.sh

browser:
	@bash scripts/ensure-browser.sh

test: venv redis browser
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

serve: venv
	@bash scripts/serve.sh

# docker-compose.yml for real: build, run three replicas, check through the proxy, take it down.
container-smoke: venv
	@bash scripts/container-smoke.sh

# Each benchmark prints its figures (and the machine); none asserts on time.
bench: venv redis
	$(PY) bench/export.py
	$(PY) bench/serve.py
	$(PY) bench/retrieval.py
	$(PY) bench/distill_shapes.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
