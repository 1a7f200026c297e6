# The two quick-start commands, `make demo` and `make test`, do all the set-up
# on a fresh machine: a virtual environment in .venv, torch, Eigen, the build.
#
#   TORCH_SPEC   which torch to install (default: the CPU build 2.13.0;
#                anything from 2.11 to 2.14 works, e.g. TORCH_SPEC=torch==2.14.1)
#   PYTHON       the interpreter that creates the environment (default python3)
#   DEMO_ARGS    extra arguments for `make demo`, e.g. DEMO_ARGS="--dataset etth1"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
CXX_SOURCES := $(shell find csrc cuda -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: venv build demo test lint format cuda-compile clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: venv
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'etap_torch_checkout.pth').write_text('$(CURDIR)\\n')"

demo: build
	$(PY) -m etap_torch demo $(DEMO_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

cuda-compile: venv
	bash scripts/check_cuda_compile.sh $(PY)

test: build lint cuda-compile
	$(PY) -m pytest -q tests

clean:
	rm -rf build etap_torch/_C*.so
