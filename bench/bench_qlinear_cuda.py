"""Latency of one W4 (and W2/W8) quantized linear layer on a CUDA GPU, per backend, against bf16 F.linear.

For the device session (``bench/gpu_session.sh``): the CUDA backends of ``auto_round.inference.backends``,
``cuda_int4`` (torch's tinygemm) and ``triton`` (our kernel), beside ``torch`` (dequantize + cuBLAS) and the
dense bf16 layer, at 1 / 16 / 128 / 2048 tokens, on the layer shapes an 8B Llama and SmolLM2 have (SmolLM2's
576-wide inputs leave a padded last group at group size 128). Cases are interleaved round by round, timed with
CUDA events after a warm-up (the Triton kernel compiles there), medians reported; every case's output is
compared with the fp32 product of the dequantized weight (``rel_err``). A case that fails records its error
instead of stopping the bench.

    python3 bench/bench_qlinear_cuda.py [--rounds 20] [--json bench/results/qlinear_cuda.json]

No GPU has run this yet (none lent so far): on a machine without CUDA it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from auto_round.inference.backends import select_backend
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

RESULTS = Path(__file__).resolve().parent / "results" / "qlinear_cuda.json"
# (name, out_features, in_features, bits, group_size)
LAYERS = [("8B q/o 4096x4096", 4096, 4096, 4, 128), ("8B gate/up 14336x4096", 14336, 4096, 4, 128),
          ("8B down 4096x14336", 4096, 14336, 4, 128), ("SmolLM2 gate/up 1536x576", 1536, 576, 4, 128),
          ("8B gate/up W2G64", 14336, 4096, 2, 64), ("8B gate/up W8G128", 14336, 4096, 8, 128)]
TOKENS = [1, 16, 128, 2048]


def _quantized(out_f: int, in_f: int, bits: int, group_size: int) -> QuantizedWeight:
    torch.manual_seed(0)
    params = QuantParams(bits=bits, group_size=group_size, scheme="sym")
    codes, scale, zero = quantize_weight(torch.randn(out_f, in_f) * 0.02, params)
    return QuantizedWeight(codes, scale, zero, bits, group_size, True)


def _time(cases: Dict[str, Callable[[], torch.Tensor]], rounds: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: kernels compile, caches fill
        fn()
    torch.cuda.synchronize()
    names = list(cases)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            cases[k]()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_layer(name: str, out_f: int, in_f: int, bits: int, gs: int, rounds: int) -> dict:
    qw = _quantized(out_f, in_f, bits, gs)
    dense = qw.dequantize(torch.float32).cuda()
    w_bf16 = dense.to(torch.bfloat16)
    layers, errors = {}, {}
    for backend in ("cuda_int4", "triton", "torch"):
        try:
            layer = QuantLinear.from_quantized(qw, "auto_round:auto_gptq", backend=backend).cuda()
            layer.post_init()
            layers[backend] = layer
        except Exception as e:  # noqa: BLE001 - recorded: a backend that cannot run this layer
            errors[backend] = f"{type(e).__name__}: {e}"[:500]
    rows = []
    for n in TOKENS:
        x = torch.randn(n, in_f, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), dense)
        cases: Dict[str, Callable[[], torch.Tensor]] = {"bf16 F.linear": lambda x=x: F.linear(x, w_bf16)}
        for b, layer in layers.items():
            cases[b] = lambda x=x, layer=layer: layer(x)
        with torch.no_grad():
            ok = {}
            for k, fn in cases.items():
                try:
                    y = fn()
                    ok[k] = float((y.float() - ref).abs().max() / ref.abs().max())
                except Exception as e:  # noqa: BLE001 - recorded per case
                    errors[f"{k} @ {n} tokens"] = f"{type(e).__name__}: {e}"[:500]
            timed = _time({k: v for k, v in cases.items() if k in ok}, rounds)
        base = timed.get("bf16 F.linear")
        for k, ms in timed.items():
            rows.append({"case": k, "tokens": n, "median_ms": round(ms, 4), "x_bf16": round(ms / base, 2) if base else None,
                         "rel_err": ok[k]})
            print(f"  {name:<26} {n:>5} tok  {k:<14} {ms:8.4f} ms  x{ms / base:5.2f}  err {ok[k]:.2e}", flush=True)
    return {"layer": f"{name} W{bits}G{gs} sym", "out_features": out_f, "in_features": in_f,
            "auto": select_backend("cuda", bits, gs, in_f, out_f).name,
            "rows": rows, "errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_qlinear_cuda: no CUDA device here; run it on the device machine (bench/gpu_session.sh)",
              file=sys.stderr)
        return 2
    record = {"benchmark": "qlinear_cuda", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rounds": args.rounds, "layers": [bench_layer(*layer, args.rounds) for layer in LAYERS]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
