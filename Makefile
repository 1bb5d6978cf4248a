# The two entry points of the README: `make demo` and `make test`.
# Both create .venv (Python 3.11), install the CPU torch wheel first, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.voxplain-installed

.PHONY: install system-deps demo demo-models $(TRAIN_DEMO) test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/voxplain demo --out demo-output

# Regenerate the phantom cohorts and retrain the demo's three models from scratch on the CPU
# (one torch thread each, two trainings at a time, fixed seeds: the same commit gives the same
# scores), score them on the test cohort, then copy them into the package. Not part of
# `make test`. Everything is written under $(MODELS_BUILD); the cohorts, settings, times and
# scores are in src/voxplain/assets/models/README.md.
MODELS_BUILD ?= build/demo-models
COHORT := $(VENV)/bin/voxplain phantom --resolution 3 --healthy-fraction 0.1 --quiet
DEMO_MODELS := demo-unet demo-grade demo-slices
TRAIN_DEMO := $(addprefix train-,$(DEMO_MODELS))
ASSETS := src/voxplain/assets/models

demo-models: install
	$(COHORT) --out $(MODELS_BUILD)/train --subjects 300 --seed 1
	$(COHORT) --out $(MODELS_BUILD)/val --subjects 60 --seed 2
	$(COHORT) --out $(MODELS_BUILD)/test --subjects 100 --seed 3
	$(MAKE) --no-print-directory -j2 $(TRAIN_DEMO)
	$(PY) benchmarks/bench_models.py $(addprefix $(MODELS_BUILD)/,$(DEMO_MODELS))
	for m in $(DEMO_MODELS); do \
		rm -rf $(ASSETS)/$$m.new && mkdir $(ASSETS)/$$m.new && \
		cp $(MODELS_BUILD)/$$m/config.json $(MODELS_BUILD)/$$m/model.pt $(MODELS_BUILD)/$$m/history.json \
			$(MODELS_BUILD)/$$m/learning_curve.png $(ASSETS)/$$m.new/ && \
		rm -rf $(ASSETS)/$$m && mv $(ASSETS)/$$m.new $(ASSETS)/$$m || exit 1; \
	done

# one demo model (the cohorts must exist): make train-demo-unet
$(TRAIN_DEMO): train-%: install
	$(VENV)/bin/voxplain train --preset $* --data $(MODELS_BUILD)/train --val-data $(MODELS_BUILD)/val \
		--test-data $(MODELS_BUILD)/test --out $(MODELS_BUILD)/$* --quiet

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
