# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test demo ablate bench bundles

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps monailabel==0.8.5
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/network_speed.py
	$(BIN)/python benchmarks/data_speed.py

demo: setup
	test -f demo_output/data/datalist.json || $(BIN)/uniseg generate-phantoms --out demo_output/data
	$(BIN)/uniseg check-data demo_output/data/datalist.json
	$(BIN)/uniseg demo --out demo_output --bundle bundles/uniseg_pretrain

ablate: setup
	$(BIN)/uniseg ablate --out ablation_output

bundles: setup
	$(BIN)/uniseg pack-bundles --out dist
