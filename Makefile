# `make sft`, `make test` and friends create the virtualenv on first use; nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/smoke.yaml
ARGS ?=
ACCELERATE_CONFIG ?= accelerate_configs/single_gpu.yaml
# The smoke models, one per family (sft/tiny.py): Llama-2, Qwen2.5, Llama-3, Qwen3, GLM-4 and R1-Distill lookalikes.
TINY_MODELS := build/tiny-llama/config.json build/tiny-qwen2_5/config.json build/tiny-llama3/config.json \
	build/tiny-qwen3/config.json build/tiny-qwen3_2507/config.json build/tiny-glm4/config.json \
	build/tiny-r1_distill/config.json
MODEL_PATH ?= output/smoke
MERGED_DIR ?= $(MODEL_PATH)-merged
SMOKE_OUTPUT := output/smoke
GGUF_DIR ?= $(MODEL_PATH)-gguf
# CHECKPOINT=selected (what `make select` chose), checkpoint-N or final: the checkpoint merge/serve/export-gguf take.
CHECKPOINT ?=
CHECKPOINT_ARG = $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
# llama.cpp's GGUF converter, as vendored in this llama-cpp-python source release (PyPI is all CI can reach).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP := build/llama.cpp
CONVERTER := $(LLAMA_CPP)/convert_hf_to_gguf.py
CONVERTER_FILES := convert_hf_to_gguf.py conversion gguf-py LICENSE
LLAMA_CPP_SDIST := build/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
# llama.cpp's own tokenizer and runtime, compiled for this CPU from the same source (the export quantizes with
# llama-quantize; the tests compare llama-tokenize and llama-simple with training). Nothing is downloaded: no web
# UI, no OpenSSL, no server, tests or apps.
LLAMA_CPP_SRC := build/llama.cpp-src
LLAMA_CPP_BUILD := build/llama.cpp-build
LLAMA_CPP_TOOLS := llama-quantize llama-tokenize llama-simple
# Our own small program against the same libllama: a conversation's chat prompt as llama.cpp renders and tokenizes it.
LLAMA_CHAT_TOKENS := $(LLAMA_CPP_BUILD)/bin/llama-chat-tokens
LLAMA_CPP_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON
LLAMA_CPP_JOBS ?= 2
LAUNCH = $(PY) -m sft.train.accelerate_config $(ACCELERATE_CONFIG) && $(VENV)/bin/accelerate launch --quiet --config_file $(ACCELERATE_CONFIG) sft/run.py
# eval/chat/merge of the default model train the smoke run first on a fresh clone.
MODEL_DEPS = $(if $(filter $(SMOKE_OUTPUT),$(MODEL_PATH)),$(SMOKE_OUTPUT)/run_summary.json)

.PHONY: help venv lock sft dpo pairs plan data audit tiny-model eval select chat serve merge export-gguf export-setup llama-cpp test test-fast mutate lint clean bench-data bench bench-gpu gpu-check gpu-kit

help:
	@echo "make sft [RECIPE=recipes/smoke.yaml] [ARGS='--flag value ...']  train with a recipe"
	@echo "make dpo [RECIPE=recipes/smoke_dpo.yaml] [ARGS=...]            preference-tune a finished SFT run (DPO)"
	@echo "make pairs [RECIPE=recipes/smoke_dpo.yaml] [ARGS=...]          mine its preference pairs alone"
	@echo "make plan [RECIPE=...] [ACCELERATE_CONFIG=...] [GPU=A100]       what a run would decide, without loading or writing"
	@echo "make data [RECIPE=...] [ARGS=...]                               prepare a recipe's data alone (stats.json)"
	@echo "make audit [RECIPE=...] or MODEL_PATH=<run>                   certify labels, template, stop tokens and export"
	@echo "make eval [MODEL_PATH=output/smoke] [ARGS=--compare_base]       evaluate a trained run on its test split"
	@echo "make eval ARGS='--knowledge cmmlu'                              ... and base vs fine-tuned accuracy (lm-eval)"
	@echo "make select [MODEL_PATH=output/smoke] [ARGS='--max_loss_increase 0.05']  the checkpoint to keep"
	@echo "make eval MODEL_PATH=output/smoke-dpo ARGS='--compare_base --compare_runs output/smoke'  base vs SFT vs DPO"
	@echo "make chat [MODEL_PATH=output/smoke]                             chat with it in the terminal"
	@echo "make serve [MODEL_PATH=output/smoke] [ARGS='--port 8000']     OpenAI-compatible API + chat page on 127.0.0.1"
	@echo "make merge [MODEL_PATH=output/smoke] [CHECKPOINT=selected] [MERGED_DIR=...]           merge the adapter into a standalone model"
	@echo "make export-gguf [MODEL_PATH=output/smoke] [GGUF_DIR=...] [ARGS='--quantization q8_0']  GGUF + Ollama Modelfile"
	@echo "make llama-cpp                                                  build llama.cpp's quantize/tokenize/simple once (K-quants, parity tests)"
	@echo "make test                                                       run the whole test suite"
	@echo "make test-fast                                                  its quick tier (no training run, server or browser)"
	@echo "make mutate [MUTANTS='sft.train.plan.*']                        mutation testing of the decision modules (mutmut)"
	@echo "make lint                                                       ruff"
	@echo "make lock                                                       regenerate requirements.txt (the tested versions)"
	@echo "make tiny-model                                                 build the smoke runs' tiny models"
	@echo "make bench-data [ARGS='--dialogues 1000000']                    time data preparation on synthetic LCCC"
	@echo "make bench [ARGS='--repeats 3']                                 CPU speed: our launcher vs TRL's trl sft"
	@echo "make bench-gpu [ARGS='--variants sdpa,fa2']                     QLoRA speed of a Llama-2-7B shape on one GPU"
	@echo "make gpu-check                                                  check a GPU machine end to end (one JSON)"
	@echo "make gpu-kit                                                    wheels + one command for a bare offline GPU machine"

venv: $(VENV)/.installed

# First the exact versions the suite passed with (requirements.txt), then the project in editable mode with its
# test tools (their ranges in pyproject.toml): `sft` imports from this checkout everywhere.
$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# requirements.txt: every package `pip install -e ".[all]"` pulls in, pinned to what this .venv has (where the suite
# passed), resolved from pyproject.toml by uv. torch is pinned without its build label (+cpu, +cu130): pip takes
# the build its index offers for that version.
lock:
	mkdir -p build
	$(PY) -m pip freeze --exclude-editable | sed 's/+[a-z0-9]*$$//' > build/installed-versions.txt
	$(VENV)/bin/uv pip compile --quiet pyproject.toml --extra all --constraint build/installed-versions.txt \
		--custom-compile-command "make lock" --annotation-style line --output-file requirements.txt

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
	$(LAUNCH) --config $(RECIPE) --dry_run true $(if $(GPU),--gpu $(GPU)) $(ARGS)

data: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m sft data --config $(RECIPE) $(ARGS)

# A recipe (RECIPE) or, given MODEL_PATH on the command line, a trained run and its export.
audit: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m sft audit $(if $(filter command line,$(origin MODEL_PATH)),--model_path $(MODEL_PATH),--config $(RECIPE)) $(ARGS)

bench-data: $(VENV)/.installed
	$(PY) -m benchmarks.bench_data $(ARGS)

bench: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m benchmarks.bench_speed $(ARGS)

bench-gpu: $(VENV)/.installed
	$(PY) -m benchmarks.bench_gpu $(ARGS)

gpu-check: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m benchmarks.gpu_check $(ARGS)

# build/gpu-kit/: the wheels a bare GPU machine lacks and command.sh, the one command to run there (docs/gpus-and-speed.md).
gpu-kit: $(VENV)/.installed
	$(PY) -m benchmarks.gpu_kit $(ARGS)

$(SMOKE_OUTPUT)/run_summary.json: | $(VENV)/.installed $(TINY_MODELS)
	$(LAUNCH) --config recipes/smoke.yaml

# Score every checkpoint of a run and keep the best within the forgetting budget (ARGS='--max_knowledge_drop 1 ...').
select: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft select --model_path $(MODEL_PATH) $(ARGS)

eval: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft eval --model_path $(MODEL_PATH) $(ARGS)

chat: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft chat --model_path $(MODEL_PATH) $(ARGS)

serve: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft serve --model_path $(MODEL_PATH) $(CHECKPOINT_ARG) $(ARGS)

merge: $(VENV)/.installed $(MODEL_DEPS)
	$(PY) -m sft merge --model_path $(MODEL_PATH) $(CHECKPOINT_ARG) --output_dir $(MERGED_DIR) $(ARGS)

# 4-bit K-quants go through llama.cpp's llama-quantize.
export-gguf: export-setup $(if $(filter q%_k_m q%_k,$(ARGS)),llama-cpp) $(MODEL_DEPS)
	$(PY) -m sft export-gguf --model_path $(MODEL_PATH) $(CHECKPOINT_ARG) --output_dir $(GGUF_DIR) $(ARGS)

# The `export` extra of pyproject.toml and llama.cpp's converter (1-2 minutes, once).
export-setup: $(VENV)/.export-installed $(CONVERTER)

$(VENV)/.export-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[export]"
	touch $@

$(LLAMA_CPP_SDIST): | $(VENV)/.installed
	rm -rf build/sdist.download && mkdir -p build/sdist.download
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) \
		-d build/sdist.download
	mv build/sdist.download/$(notdir $@) $@ && rm -rf build/sdist.download

$(CONVERTER): | $(LLAMA_CPP_SDIST)
	rm -rf $(LLAMA_CPP) $(LLAMA_CPP).download && mkdir -p $(LLAMA_CPP).download
	tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_CPP).download \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,$(CONVERTER_FILES))
	mv $(LLAMA_CPP).download/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(LLAMA_CPP)
	rm -rf $(LLAMA_CPP).download

# 10-40 minutes once on 2 cores (LLAMA_CPP_JOBS=...), then skipped.
llama-cpp: $(LLAMA_CPP_BUILD)/.built $(LLAMA_CHAT_TOKENS)

$(LLAMA_CPP_BUILD)/.built: | $(LLAMA_CPP_SDIST)
	rm -rf $(LLAMA_CPP_SRC) $(LLAMA_CPP_SRC).download && mkdir -p $(LLAMA_CPP_SRC).download
	tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_CPP_SRC).download --exclude='*/llama.cpp/models' \
		--exclude='*/llama.cpp/docs' --exclude='*/llama.cpp/media' llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	mv $(LLAMA_CPP_SRC).download/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(LLAMA_CPP_SRC)
	rm -rf $(LLAMA_CPP_SRC).download
	cmake -S $(LLAMA_CPP_SRC) -B $(LLAMA_CPP_BUILD) $(LLAMA_CPP_CMAKE_FLAGS)
	cmake --build $(LLAMA_CPP_BUILD) -j $(LLAMA_CPP_JOBS) --target $(LLAMA_CPP_TOOLS)
	touch $@

$(LLAMA_CHAT_TOKENS): sft/export/llama_chat_tokens.cpp $(LLAMA_CPP_BUILD)/.built
	$(CXX) -O2 -std=c++17 -Wall -Werror -o $@ $< -isystem $(LLAMA_CPP_SRC)/include -isystem $(LLAMA_CPP_SRC)/ggml/include \
		-isystem $(LLAMA_CPP_SRC)/common -isystem $(LLAMA_CPP_SRC)/vendor -L$(LLAMA_CPP_BUILD)/bin -lllama-common -lllama \
		-Wl,-rpath,'$$ORIGIN'

test: $(VENV)/.installed $(TINY_MODELS) export-setup llama-cpp
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick tier: no training run, server, browser or export (tests marked `slow` are left out).
test-fast: $(VENV)/.installed $(TINY_MODELS)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Mutation testing (mutmut, configured in pyproject.toml; not part of CI): the functions where a one-character slip
# changes what users get (plan and machine facts, generation settings, checkpoint checks, mixture keys and weights,
# request parameters and decoding, export checks), about 1,600 mutants; MUTANTS='sft.*' for every mutant of the
# configured modules, or any other mutant-name patterns. Results stay in mutants/ (`mutmut results`, `mutmut show`).
MUTATE_SCOPE := 'sft.train.plan.*' 'sft.train.machine.*' 'sft.common.generation.*' \
	'sft.train.checkpoints.x_checkpoint_to_resume*' 'sft.train.checkpoints.x_damaged_file*' \
	'sft.train.checkpoints.x_newest_loadable_checkpoint*' 'sft.train.checkpoints.x_*complete_checkpoint*' \
	'sft.train.checkpoints.x_unused_name*' 'sft.train.checkpoints.x_set_aside*' \
	'sft.data.mixture.x_mixed_source*' 'sft.data.mixture.x_mix_train*' 'sft.data.mixture.x_repeated_rows*' \
	'sft.data.mixture.x_prepared_mixture*' 'sft.serving.api.*ChatCompletionRequest*' \
	'sft.serving.generator.*Decoding*' 'sft.serving.generator.*ChooseTokens*' 'sft.serving.generator.*OpenAIPenalties*' \
	'sft.serving.generator.*EndRows*' 'sft.serving.generator.x_split_at_stop*' 'sft.serving.server.*Service*decoding*' \
	'sft.serving.server.*Service*reply_budget*' 'sft.serving.server.*Service*check_length*' 'sft.export.gguf.x_check_*' \
	'sft.export.gguf.x_*merge_scores*' 'sft.export.gguf.x_llama_cpp_adds_bos*' 'sft.export.gguf.x_gguf_end_tokens*' \
	'sft.export.gguf.x_ollama_parameters*' 'sft.export.gguf.x_space_prefix_after_special_tokens*'
MUTANTS ?= $(MUTATE_SCOPE)
mutate: $(VENV)/.installed $(TINY_MODELS) export-setup
	rm -rf mutants
	nice $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build output .pytest_cache
