# The two entry points of the README: `make demo` and `make test`.
# Both create .venv (Python 3.11), install the CPU torch wheel first, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.voxplain-installed

.PHONY: install system-deps demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/voxplain demo --out demo-output

# Tests drive a real headless chromium (report viewer) and a real PostgreSQL server
# (sweep across machines); install Debian's packages when missing (needs root).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

test: install system-deps
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 -q tests

# Speed against the reference libraries (Captum, PAIR saliency), one table per script.
bench: install
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_cxai.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
