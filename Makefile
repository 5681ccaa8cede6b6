# `make sft`, `make test` and friends create the virtualenv on first use; nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/smoke.yaml
ARGS ?=
ACCELERATE_CONFIG ?= accelerate_configs/single_gpu.yaml
# The smoke models, one per family (sft/tiny.py): Llama-2, Qwen2.5 and Llama-3 lookalikes.
TINY_MODELS := build/tiny-llama/config.json build/tiny-qwen2_5/config.json build/tiny-llama3/config.json
MODEL_PATH ?= output/smoke
MERGED_DIR ?= $(MODEL_PATH)-merged
SMOKE_OUTPUT := output/smoke
GGUF_DIR ?= $(MODEL_PATH)-gguf
# llama.cpp's GGUF converter, as vendored in this llama-cpp-python source release (PyPI is all CI can reach).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP := build/llama.cpp
CONVERTER := $(LLAMA_CPP)/convert_hf_to_gguf.py
CONVERTER_FILES := convert_hf_to_gguf.py conversion gguf-py LICENSE
LAUNCH = $(VENV)/bin/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) sft/run.py
# eval/chat/merge of the default model train the smoke run first on a fresh clone.
MODEL_DEPS = $(if $(filter $(SMOKE_OUTPUT),$(MODEL_PATH)),$(SMOKE_OUTPUT)/run_summary.json)

.PHONY: help venv sft dpo pairs plan data tiny-model eval chat serve merge export-gguf export-setup test test-fast lint clean bench-data bench bench-gpu gpu-check

help:
	@echo "make sft [RECIPE=recipes/smoke.yaml] [ARGS='--flag value ...']  train with a recipe"
	@echo "make dpo [RECIPE=recipes/smoke_dpo.yaml] [ARGS=...]            preference-tune a finished SFT run (DPO)"
	@echo "make pairs [RECIPE=recipes/smoke_dpo.yaml] [ARGS=...]          mine its preference pairs alone"
	@echo "make plan [RECIPE=...] [ACCELERATE_CONFIG=...]                  what a run would decide, without loading or writing"
	@echo "make data [RECIPE=...] [ARGS=...]                               prepare a recipe's data alone (stats.json)"
	@echo "make eval [MODEL_PATH=output/smoke] [ARGS=--compare_base]       evaluate a trained run on its test split"
	@echo "make eval ARGS='--knowledge cmmlu'                              ... and base vs fine-tuned accuracy (lm-eval)"
	@echo "make eval MODEL_PATH=output/smoke-dpo ARGS='--compare_base --compare_runs output/smoke'  base vs SFT vs DPO"
	@echo "make chat [MODEL_PATH=output/smoke]                             chat with it in the terminal"
	@echo "make serve [MODEL_PATH=output/smoke] [ARGS='--port 8000']     OpenAI-compatible API + chat page on 127.0.0.1"
	@echo "make merge [MODEL_PATH=output/smoke] [MERGED_DIR=...]           merge the adapter into a standalone model"
	@echo "make export-gguf [MODEL_PATH=output/smoke] [GGUF_DIR=...] [ARGS='--quantization q8_0']  GGUF + Ollama Modelfile"
	@echo "make test                                                       run the whole test suite"
	@echo "make test-fast                                                  its quick tier (no training run, server or browser)"
	@echo "make lint                                                       ruff"
	@echo "make tiny-model                                                 build the smoke runs' tiny models"
	@echo "make bench-data [ARGS='--dialogues 1000000']                    time data preparation on synthetic LCCC"
	@echo "make bench [ARGS='--repeats 3']                                 CPU speed: our launcher vs TRL's trl sft"
	@echo "make bench-gpu [ARGS='--variants sdpa,fa2']                     QLoRA speed of a Llama-2-7B shape on one GPU"
	@echo "make gpu-check                                                  check a GPU machine end to end (one JSON)"

venv: $(VENV)/.installed

# The project installs in editable mode with its test tools: `sft` imports from this checkout everywhere.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

tiny-model: $(TINY_MODELS)

build/tiny-%/config.json: $(VENV)/.installed sft/tiny.py sft/assets/lccc_sample.json
	$(PY) -m sft tiny --family $* --output_dir build/tiny-$*

sft: $(VENV)/.installed $(TINY_MODELS)
	$(LAUNCH) --config $(RECIPE) $(ARGS)

# A DPO recipe names its SFT run (sft_run:); without a pairs_file its pairs are mined first.
DPO_RECIPE ?= $(if $(filter recipes/smoke.yaml,$(RECIPE)),recipes/smoke_dpo.yaml,$(RECIPE))

dpo: $(VENV)/.installed $(TINY_MODELS)
	$(LAUNCH) --config $(DPO_RECIPE) $(ARGS)

pairs: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m sft pairs --config $(DPO_RECIPE) $(ARGS)

plan: $(VENV)/.installed $(TINY_MODELS)
	$(LAUNCH) --config $(RECIPE) --dry_run true $(ARGS)

data: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m sft data --config $(RECIPE) $(ARGS)

bench-data: $(VENV)/.installed
	$(PY) -m benchmarks.bench_data $(ARGS)

bench: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m benchmarks.bench_speed $(ARGS)

bench-gpu: $(VENV)/.installed
	$(PY) -m benchmarks.bench_gpu $(ARGS)

gpu-check: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m benchmarks.gpu_check $(ARGS)

$(SMOKE_OUTPUT)/run_summary.json: | $(VENV)/.installed $(TINY_MODELS)
	$(LAUNCH) --config recipes/smoke.yaml

eval: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft eval --model_path $(MODEL_PATH) $(ARGS)

chat: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft chat --model_path $(MODEL_PATH) $(ARGS)

serve: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft serve --model_path $(MODEL_PATH) $(ARGS)

merge: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft merge --model_path $(MODEL_PATH) --output_dir $(MERGED_DIR) $(ARGS)

export-gguf: export-setup $(MODEL_DEPS)
	$(PY) -m sft export-gguf --model_path $(MODEL_PATH) --output_dir $(GGUF_DIR) $(ARGS)

# The `export` extra of pyproject.toml and llama.cpp's converter (1-2 minutes, once).
export-setup: $(VENV)/.export-installed $(CONVERTER)

$(VENV)/.export-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[export]"
	touch $@

$(CONVERTER): | $(VENV)/.installed
	rm -rf $(LLAMA_CPP) $(LLAMA_CPP).download && mkdir -p $(LLAMA_CPP).download
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		-d $(LLAMA_CPP).download
	tar -xzf $(LLAMA_CPP).download/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP).download \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,$(CONVERTER_FILES))
	mv $(LLAMA_CPP).download/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(LLAMA_CPP)
	rm -rf $(LLAMA_CPP).download

test: $(VENV)/.installed $(TINY_MODELS) export-setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick tier: no training run, server, browser or export (tests marked `slow` are left out).
test-fast: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build output .pytest_cache
