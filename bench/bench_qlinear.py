"""Latency of one 4096x4096 W4G128 layer on CPU: cpu_int4 vs torch backend vs bf16 F.linear.

Prints a table and writes bench/results/qlinear.json. Not a test: figures depend on the machine.

    .venv/bin/python bench/bench_qlinear.py [--tokens 1 32] [--iters 20] [--threads 1]

On a shared machine the medians swing with other processes' load (the JSON records the load
average); the minima are the steadier figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

RESULTS = Path(__file__).resolve().parent / "results" / "qlinear.json"


def _time_interleaved(
    cases: Dict[str, Callable[[], torch.Tensor]], iters: int, warmup: int = 3
) -> Dict[str, Dict[str, float]]:
    """Median and min milliseconds per case; rounds alternate the cases so that load from other
    processes on the machine hits them alike."""
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for round_ in range(warmup + iters):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {"median_ms": statistics.median(v), "min_ms": min(v)} for name, v in samples.items()
    }


def _layer(size: int, group_size: int, backend: str) -> tuple:
    torch.manual_seed(0)
    weight = torch.randn(size, size) * 0.02
    codes, scale, zero = quantize_weight(weight, QuantParams(4, group_size, "sym"))
    qw = QuantizedWeight(codes, scale, zero, 4, group_size, True)
    layer = QuantLinear.from_quantized(qw, "auto_round:auto_gptq", backend=backend)
    layer.post_init()
    return layer, qw.dequantize(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    int4, w_bf16 = _layer(args.size, args.group_size, "cpu_int4")
    ref_torch, _ = _layer(args.size, args.group_size, "torch")
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.size, dtype=torch.bfloat16)
        ref = F.linear(x.float(), w_bf16.float())
        cases = {
            "bf16 F.linear": lambda x=x: F.linear(x, w_bf16),
            "cpu_int4 (bf16 x)": lambda x=x: int4(x),
            "torch backend (bf16 x)": lambda x=x: ref_torch(x),
        }
        with torch.no_grad():
            timings = _time_interleaved(cases, args.iters)
            for name, fn in cases.items():
                err = float((fn().float() - ref).abs().max() / ref.abs().max())
                row = {"case": name, "tokens": tokens, "rel_err_vs_fp32": err, **timings[name]}
                rows.append(row)
                print(
                    f"{tokens:>4} tok  {name:<24} {row['median_ms']:9.3f} ms median "
                    f"({row['min_ms']:.3f} min)  rel.err {err:.2e}"
                )
    weight_bytes = {
        "bf16": args.size * args.size * 2,
        "auto_round buffers": sum(b.numel() * b.element_size() for b in int4.buffers()),
        "cpu_int4 prepared": int4._state["packed"].numel() + int4._state["sz_float32"].numel() * 4,
    }
    result = {
        "layer": f"{args.size}x{args.size} W4G{args.group_size} sym",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],  # other processes skew the figures
        "rows": rows,
        "weight_bytes": weight_bytes,
    }
    print("weight bytes:", weight_bytes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
