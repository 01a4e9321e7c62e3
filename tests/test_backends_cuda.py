"""The CUDA inference backends: ``"cuda_int4"`` (torch's tinygemm) and ``"triton"`` (our Triton kernel).

Without a GPU (this project's CI): the Triton kernel's arithmetic in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, in a subprocess so that the setting takes effect before the kernel is built)
against :func:`dequantize_packed` + ``F.linear``, for bits 2/4/8, padded last groups, group sizes below
the kernel's K tile, odd ``out_features`` and fp16/fp32 inputs (the interpreter's bf16 ``tl.dot`` is wrong:
numpy has no bf16, so bf16 is left to the GPU tests); the selection rules, with the CUDA kernels marked
available. On a CUDA device (tests marked ``gpu``, run by ``bench/gpu_session.sh``): both backends against
the ``"torch"`` backend on the same device, and ``"auto"`` choosing them.
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from auto_round.inference import backends
from auto_round.inference.backends import select_backend
from auto_round.inference.qlinear import QuantLinear
from auto_round.inference.triton_kernels import triton_available
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

# (bits, group_size, in, out, dtype): whole groups; a padded last group (576 at 128, as SmolLM2);
# group smaller than the kernel's K tile; odd out_features; in < group size.
INTERPRETER_CASES = [(4, 32, 96, 40, "float32"), (4, 128, 576, 70, "float16"), (2, 64, 128, 33, "float16"),
                     (8, 16, 50, 24, "float32"), (4, 128, 100, 64, "float32"), (2, 32, 320, 17, "float32")]

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, torch.nn.functional as F
    from auto_round.inference.backends import PackedTensors, _torch_prepare, dequantize_packed
    from auto_round.inference.triton_kernels import wq_matmul
    from auto_round.quant.pack import pack_bits
    out = []
    for bits, gs, inf, outf, dt in json.loads(sys.argv[1]):
        dt = getattr(torch, dt)
        torch.manual_seed(bits * 1000 + inf)
        groups = -(-inf // gs)
        codes = torch.randint(0, 2 ** bits, (inf, outf), dtype=torch.int32)
        zeros = torch.randint(0, 2 ** bits, (groups, outf), dtype=torch.int32)
        scales = ((torch.rand(groups, outf) - 0.3) * 0.1).half()
        p = PackedTensors(pack_bits(codes, bits, dim=0), pack_bits(zeros, bits, dim=1), scales, bits, gs, inf,
                          outf, 0)
        state = _torch_prepare(p)
        x = torch.randn(3, 5, inf).to(dt)
        y = wq_matmul(state, x)
        w = dequantize_packed(state["qweight"], state["zeros"], scales, bits, gs, inf).to(dt)
        ref = F.linear(x.double(), w.double())
        out.append({"shape": list(y.shape), "dtype": str(y.dtype), "err": float((y.double() - ref).abs().max()),
                    "max": float(ref.abs().max())})
    print(json.dumps(out))
""")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_matches_dequantize_in_the_interpreter():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(INTERPRETER_CASES)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (bits, gs, inf, outf, dt), r in zip(INTERPRETER_CASES, results):
        assert r["shape"] == [3, 5, outf] and r["dtype"] == f"torch.{dt}"
        # fp32: summation order only; fp16: the output's rounding (2**-11 relative) plus the order
        tol = 1e-5 if dt == "float32" else 2.0 ** -10
        assert r["err"] <= tol * r["max"], (bits, gs, inf, outf, dt, r)


def test_triton_refuses_bits_it_cannot_read():
    from auto_round.inference.triton_kernels import wq_matmul

    with pytest.raises(ValueError, match="bits=3"):
        wq_matmul({"bits": 3}, torch.zeros(1, 8))


def test_inner_k_tiles():
    assert [backends._inner_k_tiles(k) for k in (32, 64, 96, 128, 576, 4096)] == [2, 4, 2, 8, 4, 8]


@pytest.fixture
def cuda_kernels_available(monkeypatch):
    """The registry as on a CUDA machine with tinygemm and Triton."""
    for name in ("cuda_int4", "triton"):
        monkeypatch.setitem(backends._BACKENDS, name, replace(backends._BACKENDS[name], is_available=lambda: True))


def test_cuda_selection(cuda_kernels_available):
    assert select_backend("cuda", 4, 128, 4096, 4096).name == "cuda_int4"
    assert select_backend("cuda", 4, 128, 576, 1536).name == "cuda_int4"  # padded last group
    assert select_backend("cuda", 4, 128, 4096, 4100).name == "triton"  # out % 8
    assert select_backend("cuda", 4, 16, 4096, 4096).name == "triton"  # group size 16
    assert select_backend("cuda", 2, 64, 4096, 4096).name == "triton"
    assert select_backend("cuda", 8, 128, 4096, 4096).name == "triton"
    assert select_backend("cuda", 3, 128, 4096, 4096).name == "torch"
    assert select_backend("cpu", 4, 128, 4096, 4096).name == "cpu_int4"  # CUDA kernels only on CUDA
    with pytest.raises(ValueError, match="out_features % 8"):
        select_backend("cuda", 4, 128, 4096, 4100, requested="cuda_int4")
    with pytest.raises(ValueError, match="bits=3"):
        select_backend("cuda", 3, 128, 4096, 4096, requested="triton")


def test_cuda_backends_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert select_backend("cuda", 4, 128, 4096, 4096).name == "torch"
    with pytest.raises(ValueError, match="not available"):
        select_backend("cuda", 4, 128, 4096, 4096, requested="cuda_int4")


# ------------------------------------------------------------------ on a CUDA device


def _qw(out_f, in_f, bits, group_size, scheme, seed=0):
    torch.manual_seed(seed)
    params = QuantParams(bits=bits, group_size=group_size, scheme=scheme)
    codes, scale, zero = quantize_weight(torch.randn(out_f, in_f), params)
    return QuantizedWeight(codes, scale, zero, bits, group_size, params.sym)


def _cuda_layer(qw, backend, packing_format="auto_round:auto_gptq"):
    layer = QuantLinear.from_quantized(qw, packing_format=packing_format, backend=backend).cuda()
    layer.post_init()
    assert layer.backend_name == backend
    return layer


GPU_SHAPES = [(4096, 4096, 128), (1536, 576, 128), (576, 1536, 64), (512, 320, 32), (256, 4096, 256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_cuda_int4_matches_the_torch_backend(scheme, tokens):
    for out_f, in_f, gs in GPU_SHAPES:
        qw = _qw(out_f, in_f, 4, gs, scheme)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        ref = _cuda_layer(qw, "torch")(x).float()
        for backend in ("cuda_int4",) + (("triton",) if triton_available() else ()):
            y = _cuda_layer(qw, backend)(x).float()
            # bf16 output rounding, and tinygemm's bf16 scales/zero terms (a relative 2**-8 per weight)
            assert float((y - ref).abs().max() / ref.abs().max()) <= 2.0 ** -6, (backend, out_f, in_f, gs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_matches_dequantize_on_cuda(bits, dtype):
    for out_f, in_f, gs in GPU_SHAPES + [(100, 300, 16), (33, 64, 64)]:
        qw = _qw(out_f, in_f, bits, gs, "asym")
        layer = _cuda_layer(qw, "triton")
        x = torch.randn(9, in_f, device="cuda", dtype=dtype)
        ref = F.linear(x.double(), qw.dequantize(torch.float32).to(dtype).double().cuda())
        y = layer(x).double()
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
        assert float((y - ref).abs().max() / ref.abs().max()) <= tol, (bits, dtype, out_f, in_f, gs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_the_cuda_kernels():
    for bits, expected in ((4, "cuda_int4"), (2, "triton" if triton_available() else "torch")):
        layer = QuantLinear.from_quantized(_qw(256, 512, bits, 128, "sym"), "auto_round:auto_gptq").cuda()
        layer.post_init()
        assert layer.backend_name == expected
