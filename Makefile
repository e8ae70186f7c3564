# visual_search: `make demo` runs the pipeline on the sample catalog, `make test` runs the tests.
# Both create .venv (Python 3.11) and install what they need on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_IMAGES ?= 1000
DEMO_PORT ?= 8000
# DEMO_SERVE_ARGS=--once stops the service after the sample query.
DEMO_SERVE_ARGS ?=
DEMO_DIR = .cache/demo-$(DEMO_IMAGES)

.PHONY: install demo test lint format bench-embed clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m visual_search.sample --cache .cache --out $(DEMO_DIR)/catalog.parquet --limit $(DEMO_IMAGES)
	$(BIN)/python jobs/reindex.py --catalog $(DEMO_DIR)/catalog.parquet \
		--work $(DEMO_DIR)/embeddings --index-root $(DEMO_DIR)/index --shards 2
	$(BIN)/python -m serve.demo --index-root $(DEMO_DIR)/index --port $(DEMO_PORT) $(DEMO_SERVE_ARGS)

test: install
	sh scripts/install_browser.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-embed: install
	$(BIN)/python bench/embed.py

clean:
	rm -rf $(VENV) .cache/demo-* .pytest_cache .ruff_cache
