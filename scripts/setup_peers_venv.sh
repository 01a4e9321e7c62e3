#!/usr/bin/env bash
# .venv-peers: GPTQModel, optimum (transformers' GPTQ loading goes through it) and AutoAWQ beside the project's
# locked packages, for bench/bench_peers.py (their checkpoints in our loader, ours in theirs). The venv sees
# .venv's site-packages through a .pth file, so torch and transformers are the locked ones and .venv itself is
# never changed; the tools' own dependencies go into .venv-peers, constrained to the lock where the lock has
# them. AutoAWQ (archived upstream) is installed without its dependencies, which the others already bring.
# Not a dependency of the project.
set -euo pipefail
PY=${PY:-python3}
VENV=${PEERS_VENV:-.venv-peers}
test -x .venv/bin/python || { echo "no .venv: run make venv first"; exit 2; }
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/_main_venv.pth"
"$VENV/bin/pip" install --quiet -c requirements-lock.txt "gptqmodel==${GPTQMODEL_VERSION:-7.7.0}" \
    "optimum==${OPTIMUM_VERSION:-2.3.0}"
"$VENV/bin/pip" install --quiet --no-deps "autoawq==${AUTOAWQ_VERSION:-0.2.9}"
"$VENV/bin/python" -c "import awq, gptqmodel, optimum, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
