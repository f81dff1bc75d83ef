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

demo: $(VENV)/.ready-test  ## photos -> WebDataset -> Ray tokenization (tiny) -> Parquet -> summary -> GPT-tiny training -> samples
	$(PY) -m pipelines.producer.samples out/demo/photos
	$(PY) -m jobs.tokenize --input out/demo/photos --output out/demo/tokens --variants center,flip --config tiny
	$(PY) -m jobs.inspect out/demo/tokens --plot out/demo/usage.png
	rm -rf out/demo/gpt
	$(PY) -m jobs.train_gpt --data out/demo/tokens --out out/demo/gpt --size GPT-tiny --global-batch 4 --max-steps 30 --ckpt-every 30 --precision fp32
	$(PY) -m jobs.sample --gpt out/demo/gpt/step-00000030.pt --size GPT-tiny --config tiny --classes 0,1,2 --per-class 3 --out out/demo/samples.png

test: $(VENV)/.ready-test  ## the default suite (what CI runs)
	$(PY) -m pytest -q -m "not slow" --durations=20

test-all: $(VENV)/.ready-test  ## every test, including the slow ones
	$(PY) -m pytest -q

bench: $(VENV)/.ready-bench  ## benchmarks (print side-by-side ratios)
	$(PY) -m bench.encode --batch-size 2 --repeats 3 --bf16
	$(PY) -m bench.sample
	$(PY) -m bench.pipeline
	$(PY) -m bench.loader
	$(PY) -m bench.kernels
	$(PY) -m bench.s3_faults
	$(PY) -m bench.s3_get
	$(PY) -m bench.efficiency
	$(PY) -m bench.cpu_actors
	$(PY) -m bench.ray_data
	$(PY) -m bench.bf16_agreement
	$(PY) -m bench.dry_run
	$(PY) -m bench.node_cache
	$(PY) -m bench.train
	$(PY) -m bench.train_tokenizer

clean:
	rm -rf out .pytest_cache
