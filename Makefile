# Developer entry points. Everything runs inside .venv (made by `make venv`).
#   make venv      create/refresh .venv (no-op while pyproject.toml is unchanged)
#   make assets    fetch SmolLM2-135M-Instruct and the BBC corpus into $(ASSETS_DIR)
#   make demo      run the end-to-end demo (python -m auto_round.demo)
#   make test      run the offline test suite (slow/gpu tests are deselected in pyproject)
#   make bench     run every bench/bench_*.py (each prints figures, writes bench/results/)
#   make ref-venv  create .venv-ref with the reference auto-round==0.16.1 (for side-by-side runs)
#   make clean     remove build and test leftovers (keeps venvs and the asset cache)
#   make distclean also remove .venv, .venv-ref and .cache

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS_DIR ?= .cache/assets
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BENCH_SCRIPTS := $(sort $(wildcard bench/bench_*.py))

.PHONY: venv assets demo test bench ref-venv clean distclean

venv: $(STAMP)

# The stamp is newer than pyproject.toml once the install finished; a failed install leaves no
# stamp, so the next run retries.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check $(TORCH_PINS)
	$(VPY) -m pip install --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

assets: venv
	$(VPY) scripts/fetch_assets.py --cache-dir $(ASSETS_DIR)

demo: venv assets
	$(VPY) -m auto_round.demo

test: venv
	$(VPY) -m pytest -q

bench: venv
	@set -e; for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; $(VPY) $$script; \
	done

ref-venv:
	PY=$(PY) scripts/setup_reference_venv.sh

clean:
	rm -rf build dist .pytest_cache src/*.egg-info tmp_autoround*
	find . -path ./$(VENV) -prune -o -path ./.venv-ref -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-ref .cache
