# Two commands are the whole quick start: `make demo` and `make test`.
# Each creates .venv, installs torch (pinned, CPU build when available) first, then the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
# A local wheel directory (as on the project's machines) is used when present, so that pip never
# reaches for a multi-GB CUDA build of torch.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py src/tensorparity/checkpoint/_bytes.c src/tensorparity/checkpoint/tracefolder/_fused.c src/tensorparity/numerics/_kernel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH)"
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH)" -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tensorparity.examples.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules tests src

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
