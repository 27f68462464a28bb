# relayd: `make run` starts the daemon on the shipped config; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/relayd.yaml

.PHONY: run test check bench soak clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/relayd run -c $(CONFIG)

check: $(VENV)/.installed
	$(VENV)/bin/relayd check -c $(CONFIG)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) bench/run.py

soak: $(VENV)/.installed-test  # minutes of hostile clients; not part of `make test`
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info
