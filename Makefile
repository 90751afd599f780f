# make demo: set up everything and run the pipeline on the bundled MovieLens data:
#            prepare -> pretrain (the quality recipe, 6 minutes) -> evaluate with baselines -> serve a few answers.
#            `make demo TUNE=1` also runs a small tuning sweep from the pretrained bundle.
# make test: set up everything and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS ?= 0
export RAY_DATA_DEFAULT_SHUFFLE_STRATEGY ?= hash_shuffle

.PHONY: demo test venv clean serve bench-prepare bench-train bench-decode bench-serve bench-tune bench-quality

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build on local disk; install it first so nothing pulls a CUDA build
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

DEMO ?= runs/demo
TUNE ?= 0

demo: $(STAMP)
	$(VENV)/bin/recflm prepare --config jobs/configs/prepare_laptop.yaml out=$(DEMO)/data --skip-existing --preview 1
	rm -rf $(DEMO)/train  # a fresh run each time (the same run name would resume the last one)
	$(VENV)/bin/recflm pretrain --config jobs/configs/pretrain_laptop.yaml data=$(DEMO)/data out=$(DEMO)/bundle \
		storage_path=$(DEMO)/train
	$(VENV)/bin/recflm evaluate --bundle $(DEMO)/bundle --baselines sasrec_minutes=2
ifeq ($(TUNE),1)
	$(VENV)/bin/recflm tune --config jobs/configs/tune_laptop.yaml bundle=$(DEMO)/bundle data=$(DEMO)/data
endif
	$(VENV)/bin/recflm serve --bundle $(DEMO)/bundle --port 0 --demo

serve: $(STAMP)
	$(VENV)/bin/recflm serve --bundle $(DEMO)/bundle

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench-prepare: $(STAMP)
	$(PY) -m jobs.bench_prepare

bench-train: $(STAMP)
	$(PY) -m jobs.bench_train

bench-decode: $(STAMP)
	$(PY) -m jobs.bench_decode --bundle $(DEMO)/bundle

bench-serve: $(STAMP)
	$(PY) -m jobs.bench_serve

bench-tune: $(STAMP)
	$(PY) -m jobs.bench_tune

# recflm (quality recipe) against popularity, two-tower and SASRec on the bundled MovieLens data; any table:
# $(PY) -m jobs.bench_quality --table FILE --columns user=..,item=..,ts=.. [--budget-minutes N]
bench-quality: $(STAMP)
	$(PY) -m jobs.bench_quality --bundled

clean:
	rm -rf runs $(VENV)
