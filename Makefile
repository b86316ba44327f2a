# make demo   - the offline demo: synthetic data, tiny model, fine-tune, before/after metrics, report
# make demo-rl - the same, then GRPO with an exact-match reward from the fine-tuned model: SFT -> GRPO table
# make test   - the CPU test suite (offline, minutes), the fault and resume cases included
# make test-fast - the same without the long end-to-end runs (marked `long`); under 3 minutes
# make bench  - benchmarks under bench/ (not part of the tests)
# make gpu-check - on a CUDA machine: the `gpu`-marked tests and bench/gpu_check.py (quick figures), one table,
#               bench/results/gpu_check.json; GPU_PIP_ARGS="--no-index --find-links .whl" installs the extras offline
# Each target creates .venv and installs vlmtune with pinned dependencies first, if needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo demo-rl test test-fast bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps pycocoevalcap==1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlmtune demo --out demo_out

demo-rl: $(STAMP)
	$(VENV)/bin/vlmtune demo --rl --out demo_out

test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15 -m 'not gpu and not long'

bench: $(STAMP)
	$(VENV)/bin/python bench/train_speed.py
	$(VENV)/bin/python bench/eval_speed.py
	$(VENV)/bin/python bench/serve_speed.py
	$(VENV)/bin/python bench/vision_cache.py
	$(VENV)/bin/python bench/plan_validation.py
	$(VENV)/bin/python bench/plan_published.py

gpu-check: $(STAMP)
	$(VENV)/bin/pip install -q $(GPU_PIP_ARGS) -e '.[deepspeed,qlora]' || echo "gpu-check: DeepSpeed/bitsandbytes not installed; their checks will say skipped"
	$(VENV)/bin/pip install -q $(GPU_PIP_ARGS) --only-binary=:all: flash-attn || echo "gpu-check: no flash-attn wheel (it is never compiled here); its check will say skipped"
	$(VENV)/bin/python bench/gpu_check.py

clean:
	rm -rf demo_out .pytest_cache
