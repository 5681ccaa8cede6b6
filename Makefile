# `make sft`, `make test` and friends create the virtualenv on first use; nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/smoke.yaml
ARGS ?=
ACCELERATE_CONFIG ?= accelerate_configs/single_gpu.yaml
TINY_MODEL := build/tiny-llama

.PHONY: help venv sft tiny-model test lint clean

help:
	@echo "make sft [RECIPE=recipes/smoke.yaml] [ARGS='--flag value ...']  train with a recipe"
	@echo "make test                                                       run the test suite"
	@echo "make lint                                                       ruff"
	@echo "make tiny-model                                                 build the smoke run's tiny model"

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

tiny-model: $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json: $(VENV)/.installed sft/tiny.py sft/assets/lccc_sample.json
	$(PY) -m sft.tiny --output_dir $(TINY_MODEL)

sft: $(VENV)/.installed $(TINY_MODEL)/config.json
	$(VENV)/bin/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) sft/run.py --config $(RECIPE) $(ARGS)

test: $(VENV)/.installed $(TINY_MODEL)/config.json
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build output .pytest_cache
