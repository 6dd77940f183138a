# make quickstart : set up .venv, then train + evaluate the offline quickstart (runs/quickstart)
# make test       : set up .venv, then run the test suite (all but GPU tests)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-fast lint install

quickstart: install
	$(VENV)/bin/vlm-tune train configs/quickstart.yaml --overwrite

test: install
	$(PY) -m pytest -m "not gpu" -q

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow" -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@
