# relayd: `make run` starts the daemon on the shipped config; `make test` runs every test.
# `make demo` shows a stream through relayd without an account; `make dist` builds a wheel;
# `make install` / `make uninstall` put relayd on a VM (README.md, "Install on a VM").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/relayd.yaml

# install: PREFIX holds the venv ($(PREFIX)/venv) and README; DESTDIR stages the whole tree
# (PREFIX, /etc/relayd, the unit) under another root, for packaging checks and tests.
PREFIX  ?= /opt/relayd
DESTDIR ?=
UNITDIR ?= /etc/systemd/system
ETC     := $(DESTDIR)/etc/relayd
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' relayd/__init__.py)
WHEEL   := dist/relayd-$(VERSION)-py3-none-any.whl
UNITS   := relayd.service relayd-reload.path relayd-reload.service

# demo ports (relayd, its admin listener, the fake provider)
DEMO_PORT          ?= 8080
DEMO_ADMIN_PORT    ?= 9090
DEMO_PROVIDER_PORT ?= 8089

.PHONY: run test check bench soak clean demo dist install uninstall

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

demo: $(VENV)/.installed
	RELAYD_DEMO_PORT=$(DEMO_PORT) RELAYD_DEMO_ADMIN_PORT=$(DEMO_ADMIN_PORT) \
	RELAYD_DEMO_PROVIDER_PORT=$(DEMO_PROVIDER_PORT) $(PY) -m relayd.demo --config config/demo.yaml

# pip builds the wheel in an isolated environment (setuptools and wheel from the package
# index or pip's cache, as pyproject.toml asks); relayd's own dependencies are not fetched.
dist: $(VENV)/.installed
	rm -rf dist/relayd-*.whl build
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps . -w dist
	@test -f $(WHEEL) || { echo "make dist: expected $(WHEEL)"; exit 1; }
	@echo "built $(WHEEL)"

# Safe to run again: the venv is kept and the package upgraded in place; files under
# /etc/relayd are written only when absent, never over an operator's copy.
install: dist
	@case "$(PREFIX)" in /?*) ;; *) echo "make install: PREFIX must be an absolute path, not '$(PREFIX)'"; exit 1;; esac
	test -x $(DESTDIR)$(PREFIX)/venv/bin/python || $(PYTHON) -m venv $(DESTDIR)$(PREFIX)/venv
	$(DESTDIR)$(PREFIX)/venv/bin/python -m pip install --quiet --disable-pip-version-check $(WHEEL)
	$(DESTDIR)$(PREFIX)/venv/bin/python -m pip install --quiet --disable-pip-version-check \
		--no-deps --force-reinstall $(WHEEL)
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/README.md
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for u in $(UNITS); do \
		sed 's|/opt/relayd|$(PREFIX)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u; \
	done
	test -d $(ETC) || install -d -m 0755 $(ETC)
	test -e $(ETC)/relayd.yaml || install -m 0644 config/relayd.yaml $(ETC)/relayd.yaml
	test -e $(ETC)/relayd.env || install -m 0600 systemd/relayd.env $(ETC)/relayd.env
	test -e $(ETC)/credentials || install -d -m 0700 $(ETC)/credentials
	@if [ -z "$(DESTDIR)" ] && command -v useradd >/dev/null && ! id relayd >/dev/null 2>&1; then \
		echo "creating system user relayd"; \
		useradd --system --user-group --no-create-home --home-dir /nonexistent \
			--shell /usr/sbin/nologin relayd; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed relayd $(VERSION) into $(DESTDIR)$(PREFIX)/venv"
	@echo "config: $(ETC)/relayd.yaml, keys: $(ETC)/relayd.env or $(ETC)/credentials/ (existing files kept)"
	@echo "first start: systemctl enable --now relayd; after an upgrade: systemctl restart relayd"

# Keeps /etc/relayd (config, keys, credentials) and the relayd user: they are the operator's.
uninstall:
	@case "$(PREFIX)" in /?*) ;; *) echo "make uninstall: PREFIX must be an absolute path, not '$(PREFIX)'"; exit 1;; esac
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now relayd-reload.path relayd.service || true; fi
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	rm -rf $(DESTDIR)$(PREFIX)/venv
	rm -f $(DESTDIR)$(PREFIX)/README.md
	rmdir $(DESTDIR)$(PREFIX) 2>/dev/null || true
	@echo "removed the venv and the units; kept $(ETC) (config and keys) - delete it yourself if you want it gone"

soak: $(VENV)/.installed-test  # 5 minutes of streams and hostile clients (SOAK_SECONDS); not in `make test`
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) build dist *.egg-info
