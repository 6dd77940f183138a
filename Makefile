# make quickstart : set up .venv, then train + evaluate the offline quickstart (runs/quickstart)
# make test       : set up .venv, then run the test suite (all but GPU tests)
# make test-latest: the suite in .venv-latest, with the newest release of every dependency (torch as locked)
# make lock       : the same, then (if it passed) that venv's versions become vlm_tune/requirements.lock
# make test-torchvision: the GPU user's software stack on this machine (torch's CUDA build + torchvision, in
#                   .venv-tv; no GPU needed): the processor-dependent tests with torchvision's image processors
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-fast lint install test-latest lock test-torchvision

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

# every test that needs torchvision (marker `torchvision`, failed rather than skipped here) and every test whose
# result depends on the image processors: families, their lifecycle and knobs, collation, check, rehearsal
TV_VENV ?= .venv-tv
TV_TESTS ?= tests/test_backends.py tests/test_families.py tests/test_family_gemma3.py tests/test_family_internvl.py \
	tests/test_family_lfm2vl.py tests/test_family_lifecycle.py tests/test_family_paligemma.py tests/test_collate.py \
	tests/test_check.py tests/test_smolvlm2.py tests/test_rehearsal.py tests/test_versions.py \
	tests/test_eval_feeding.py tests/test_standins_layout.py tests/test_family_knobs.py
test-torchvision:
	VLM_TUNE_TORCHVISION=1 $(MAKE) install VENV=$(TV_VENV)
	VLM_TUNE_REQUIRE_TORCHVISION=1 $(TV_VENV)/bin/python -m pytest -m "not gpu" -q $(TV_TESTS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh vlm_tune/requirements.lock
	bash scripts/setup.sh $(VENV)
	touch $@
