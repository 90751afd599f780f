# make demo: set up everything and run the pipeline on the bundled MovieLens data.
# make test: set up everything and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS ?= 0
export RAY_DATA_DEFAULT_SHUFFLE_STRATEGY ?= hash_shuffle

.PHONY: demo test venv clean bench-prepare

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build on local disk; install it first so nothing pulls a CUDA build
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recflm prepare --config jobs/configs/prepare_laptop.yaml out=runs/demo/data --preview 1

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench-prepare: $(STAMP)
	$(PY) -m jobs.bench_prepare

clean:
	rm -rf runs $(VENV)
