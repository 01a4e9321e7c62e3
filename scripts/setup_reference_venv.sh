#!/usr/bin/env bash
# Create .venv-ref: a separate environment holding the reference implementation
# (auto-round 0.16.1 from PyPI) for side-by-side benchmarks (bench/reference_runner.py).
#
# Idempotent: a stamp file .venv-ref/.installed marks a finished install.
# Usage: scripts/setup_reference_venv.sh [python]   (default python3; or PY=... env var)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-${PY:-python3}}"
VENV=.venv-ref
STAMP="$VENV/.installed"
REF_VERSION=0.16.1

if [[ -f "$STAMP" ]]; then
    echo "$VENV already set up ($(cat "$STAMP"))"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi

pip_install() {
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check "$@"; then
        echo "error: 'pip install $*' failed in $VENV." >&2
        echo "       Check that PyPI is reachable (pip config / proxy) and retry: make ref-venv" >&2
        exit 1
    fi
}

# Same torch pair as the main venv, so the comparison measures the algorithms, not torch.
pip_install torch==2.14.1 torchvision==0.29.1
# The reference pulls its own requirements (transformers, accelerate, datasets, ...);
# pin torch so pip cannot swap it.
pip_install "auto-round==${REF_VERSION}" torch==2.14.1 torchvision==0.29.1
# Loading the SmolLM2 GGUF is not needed here (the runner reads a plain HF folder),
# but psutil is used by the runner when present.
pip_install psutil

if ! "$VENV/bin/python" -c "from auto_round import AutoRound; import auto_round, sys; sys.stdout.write(auto_round.__version__)" > "$VENV/.version"; then
    echo "error: '$VENV/bin/python -c \"from auto_round import AutoRound\"' failed;" >&2
    echo "       see the traceback above (a missing or incompatible dependency of auto-round ${REF_VERSION})." >&2
    exit 1
fi
echo "auto-round $(cat "$VENV/.version") imported from $VENV"
echo "auto-round==$(cat "$VENV/.version") torch==2.14.1" > "$STAMP"
