# Every target creates the virtualenv and installs what it needs, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser wan-tools demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml blockswarm/compression/int8_native.c
	# The int8 codec's fused CPU kernels are C: Debian's gcc when no compiler is there (without one they are skipped).
	@if ! command -v cc >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned CPU wheel where it is available; anything else pulls a matching torch from the index.
	$(BIN)/python -m pip install --quiet torch==2.13.0 || $(BIN)/python -m pip install --quiet "torch>=2.5"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The monitor's page test drives a headless Chromium: Debian's packages, installed when missing and root.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation; \
	fi

# The emulated WAN (blockswarm/emulated_wan.py) runs `ip netns` and `ip link`: iproute2, installed when missing.
wan-tools:
	@if ! command -v ip >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2; \
	fi

demo: install
	$(BIN)/blockswarm demo

test: install browser wan-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install wan-tools
	$(BIN)/python bench/generate.py --preset tiny
	$(BIN)/python bench/generate.py --preset tiny --codec none
	$(BIN)/python bench/generate.py --preset tiny --family mixtral
	$(BIN)/python bench/generate.py --preset tiny --family qwen3
	$(BIN)/python bench/generate.py --preset medium
	$(BIN)/python bench/recovery.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/weights.py
	$(BIN)/python bench/balance.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/wan.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .ruff_cache
