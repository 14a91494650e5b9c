# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing, install torch==2.13.0 (a CPU wheel) first,
# then the project with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptc-installed

.PHONY: demo test lint typecheck unit schema clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

# Until the compiler lands, the demo checks the shipped specs, shows what a user sees for a
# broken one, and converts a spec to the adapter_config.json PEFT would write.
demo: $(STAMP)
	$(BIN)/adaptc validate specs/
	-$(BIN)/adaptc validate tests/data/bad_specs/unknown-field-typo.yaml
	$(BIN)/adaptc convert specs/examples/seed-opt-350m.yaml

lint: $(STAMP)
	$(BIN)/ruff check adaptc tests
	$(BIN)/ruff format --check adaptc tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

schema: $(STAMP)
	$(BIN)/adaptc schema --out schemas/adapter-spec.v1.json
	$(BIN)/adaptc schema --format markdown --out docs/spec.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
