# make demo   - the offline demo: synthetic data, tiny model, fine-tune, before/after metrics, report
# make test   - the CPU test suite (offline, minutes)
# make bench  - benchmarks under bench/ (not part of the tests)
# Each target creates .venv and installs vlmtune with pinned dependencies first, if needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlmtune demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15

bench: $(STAMP)
	$(VENV)/bin/python bench/train_speed.py
	$(VENV)/bin/python bench/eval_speed.py
	$(VENV)/bin/python bench/vision_cache.py
	$(VENV)/bin/python bench/plan_validation.py
	$(VENV)/bin/python bench/plan_published.py

clean:
	rm -rf demo_out .pytest_cache
