# make quickstart : set up .venv, then train + evaluate the offline quickstart (runs/quickstart)
# make test       : set up .venv, then run the test suite (all but GPU tests)
# make test-latest: the suite in .venv-latest, with the newest release of every dependency (torch as locked)
# make lock       : the same, then (if it passed) that venv's versions become vlm_tune/requirements.lock
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-fast lint install test-latest lock

quickstart: install
	$(VENV)/bin/vlm-tune train configs/quickstart.yaml --overwrite

test: install
	$(PY) -m pytest -m "not gpu" -q

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow" -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

test-latest:
	bash scripts/test_latest.sh

lock:
	bash scripts/test_latest.sh --write-lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh vlm_tune/requirements.lock
	bash scripts/setup.sh $(VENV)
	touch $@
