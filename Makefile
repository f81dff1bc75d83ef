# Quickstart targets. Each bootstraps .venv from pyproject.toml on first use (a few minutes),
# then reuses it; editing pyproject.toml triggers a re-install.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: demo test test-all bench clean

$(VENV)/.ready-test: pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) test
	touch $@

$(VENV)/.ready-bench: pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) test,bench
	touch $@ $(VENV)/.ready-test

demo: $(VENV)/.ready-test  ## bundled photos -> WebDataset -> Ray tokenization (tiny) -> Parquet shards -> summary
	$(PY) -m pipelines.samples out/demo/photos
	$(PY) -m jobs.tokenize --input out/demo/photos --output out/demo/tokens --variants center,flip --config tiny
	$(PY) -m jobs.inspect out/demo/tokens --plot out/demo/usage.png

test: $(VENV)/.ready-test  ## the default suite (what CI runs)
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.ready-test  ## every test, including the slow ones
	$(PY) -m pytest -q

bench: $(VENV)/.ready-bench  ## benchmarks (print side-by-side ratios)
	$(PY) -m bench.encode --batch-size 2 --repeats 3 --bf16
	$(PY) -m bench.sample
	$(PY) -m bench.pipeline

clean:
	rm -rf out .pytest_cache
