# Quickstart targets. Each bootstraps .venv from pyproject.toml on first use (a few minutes),
# then reuses it; editing pyproject.toml triggers a re-install.
VENV ?= .venv
PY := $(VENV)/bin/python
# Where `make demo` writes (a test runs the same recipe in a temporary folder).
DEMO ?= out/demo
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: demo test test-all bench clean

$(VENV)/.ready-test: pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) test
	touch $@

$(VENV)/.ready-bench: pyproject.toml tools/bootstrap.sh
	tools/bootstrap.sh $(VENV) test,bench
	touch $@ $(VENV)/.ready-test

demo: $(VENV)/.ready-test  ## photos -> WebDataset -> Ray tokenization (tiny) -> Parquet -> summary -> GPT-tiny training -> export -> samples
	$(PY) -m pipelines.producer.samples $(DEMO)/photos
	$(PY) -m jobs.tokenize --input $(DEMO)/photos --output $(DEMO)/tokens --variants center,flip --config tiny --overwrite
	$(PY) -m jobs.inspect $(DEMO)/tokens --plot $(DEMO)/usage.png
	rm -rf $(DEMO)/gpt
	$(PY) -m jobs.train_gpt --data $(DEMO)/tokens --out $(DEMO)/gpt --size GPT-tiny --global-batch 4 --max-steps 30 --ckpt-every 30 --precision fp32
	$(PY) -m jobs.export_gpt --checkpoint $(DEMO)/gpt --out $(DEMO)/gpt-tiny.pt
	$(PY) -m jobs.sample --gpt $(DEMO)/gpt-tiny.pt --size GPT-tiny --config tiny --classes 0,1,2 --per-class 3 --out $(DEMO)/samples.png

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
