# relayd: `make run` starts the daemon on the shipped config; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/relayd.yaml

.PHONY: run test check bench clean

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

# bench: relayd vs nginx vs direct (installs nginx if missing); BENCH_ARGS=--quick for a smoke run,
# BENCH_ARGS='--profile streams500' (or json) for py-spy top frames.  Results: bench/results/.
bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
