# Two commands for a newcomer: `make serve` and `make test`. Both bootstrap .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.skipserve-installed
ARCH   := $(shell uname -m)

# pip takes these torch builds from local disk; a looser spec would download GBs.
ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
endif

.PHONY: venv test test-all serve bench-engine clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Idle OpenMP threads sleep instead of spinning: on 2 cores, tests that start servers or train share them.
test: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow"

test-all: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

serve: venv
	$(VENV)/bin/skipserve serve --checkpoint default --host 127.0.0.1 --port 8000

bench-engine: venv
	$(VENV)/bin/skipserve bench engine --arch resnet56 --threads 2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
