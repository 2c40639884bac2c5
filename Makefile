# Two commands for a newcomer:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Data folder: $NNLAUNDER_DATA if set, else ../shared/data when it exists.
NNLAUNDER_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export NNLAUNDER_DATA

.PHONY: setup demo test lint bench-embed clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: could not install dataset-fashion-mnist (zhang-unrelated on MNIST needs it)"; fi
	touch $@

demo: setup
	$(BIN)/nnlaunder demo

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

bench-embed: setup
	$(BIN)/python benchmarks/embed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
