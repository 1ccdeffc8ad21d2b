# Two commands do all the set-up: `make run` and `make test`. Both can be re-run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  ?= var

.PHONY: run test lint bench setup cluster cluster-packages browser-packages screenshot system-packages guest bytecode clean

run: setup  ## install everything, build the demo guest, start the server (Rocket.toml address)
	$(VENV)/bin/gunicorn -c gunicorn.conf.py

test: setup cluster-packages browser-packages  ## install everything (the cluster extra and the browser too), build the demo guest, run the whole test suite
	$(PY) -m pytest

screenshot: setup browser-packages  ## save the dashboard with a few demo VMs to screenshots/dashboard.png (git-ignored)
	$(PY) scripts/screenshot.py

NODES ?= 3
cluster: setup cluster-packages  ## a local NODES-node Ray cluster on 127.0.0.1 and the HTTP front (docs/cluster.md)
	$(PY) -m vmmgate.cluster.local --nodes $(NODES)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup cluster-packages  ## print the benchmark tables (see README)
	$(PY) benchmarks/vmm_bench.py
	$(PY) benchmarks/http_bench.py
	$(PY) benchmarks/rpc_bench.py
	$(PY) benchmarks/slow_clients.py
	$(PY) benchmarks/boot_bench.py
	$(PY) benchmarks/restore_bench.py
	$(PY) benchmarks/warm_bench.py
	$(PY) benchmarks/cluster_bench.py

setup: system-packages $(VENV)/.installed guest bytecode

# Every VMM is a fresh Python process: byte-compiled modules make it start
# faster even where PYTHONDONTWRITEBYTECODE keeps imports from writing them.
bytecode: $(VENV)/.installed
	$(PY) -m compileall -q vmmgate

system-packages:
	scripts/install-system-packages

# Recreated when requirements.txt changes. The package itself is installed
# editable last: that puts the `vmmgate` command in $(VENV)/bin. "compat" mode
# is a plain path entry, not an import hook every Python process (each VMM)
# would pay for at start.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# An older venv's msgpack-python 0.5 owns the `msgpack` package's files.
	$(PY) -m pip uninstall --quiet --disable-pip-version-check -y msgpack-python 2>/dev/null || true
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . \
		--config-settings editable_mode=compat
	touch $@

# The cluster extra (Ray), pinned; `make run` does without it.
cluster-packages: $(VENV)/.cluster-installed

$(VENV)/.cluster-installed: $(VENV)/.installed requirements-cluster.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cluster.txt
	touch $@

# The dashboard's browser tests and `make screenshot`: Debian's chromium and
# Playwright's Python package (never its browser download); `make run` does without.
browser-packages: $(VENV)/.browser-installed
	scripts/install-system-packages --browser

$(VENV)/.browser-installed: $(VENV)/.installed requirements-ui.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-ui.txt
	touch $@

guest: $(VENV)/.installed  ## the demo kernel + initramfs in $(STATE)/guest (no-op when up to date)
	$(PY) -m vmmgate.guest build

clean:  ## remove the virtualenv and all state (VMs must be stopped first)
	rm -rf $(VENV) $(STATE)
