"""Latency of one W4 quantized linear layer on CPU, per backend, against a bf16 F.linear.

Cases, timed in one interleaved run (every round runs each case once, in a rotating order, so
load from other processes on the machine hits them alike; medians reported):

- ``bf16 F.linear``: the dense bf16 weight (the speed to beat);
- ``cpu_int4``: torch's int4 CPU kernel (above ``CPU_INT4_MAX_TOKENS`` it takes the ``torch`` path);
- ``torch``: the blocked dequantize + F.linear backend;
- ``torch (one block)``: the same with the whole layer in one block (the blocking lever);
- ``torch (former)``: the backend as it was before blocking, a verbatim copy kept in this file;
- ``torch_cached``: dequantized once, then F.linear (opt-in, weight-size memory).

Layers: 4096x4096 W4G128 and SmolLM2-135M's MLP shapes (gate/up 1536x576, whose 576 inputs make
a padded last group of 64 at group size 128, and down 576x1536); tokens 1 and 128; 1 thread.

    .venv/bin/python bench/bench_qlinear.py [--tokens 1 128] [--iters 15] [--threads 1]
    .venv/bin/python bench/bench_qlinear.py --crossover   # also: int4 kernel vs torch path by dtype

Prints a table and writes bench/results/qlinear.json. Not a test: figures depend on the machine.
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

from auto_round.inference import backends
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.pack import unpack_bits
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

RESULTS = Path(__file__).resolve().parent / "results" / "qlinear.json"

# (name, out_features, in_features)
LAYERS = [
    ("4096x4096", 4096, 4096),
    ("SmolLM2 gate/up 1536x576", 1536, 576),
    ("SmolLM2 down 576x1536", 576, 1536),
]


# ----------------------------------------------------------------------------------------------
# The "torch" backend's matmul before the blocked path (verbatim copy, for comparison only).


def _former_dequantize_packed(qweight, zeros, scales, bits, group_size, in_features):
    codes = unpack_bits(qweight, bits, dim=0, length=in_features)  # [in, out]
    groups, out_features = scales.shape
    if in_features % group_size == 0:  # broadcast over [G, group_size, out] without a gather
        codes = codes.view(groups, group_size, out_features)
        w = (codes - zeros.unsqueeze(1)).float().mul_(scales.float().unsqueeze(1))
        return w.view(in_features, out_features).t()
    idx = torch.arange(in_features, device=codes.device) // group_size
    return ((codes - zeros[idx]).float() * scales.float()[idx]).t()


def _former_torch_matmul(state, x):
    w = _former_dequantize_packed(state["qweight"], state["zeros"], state["scales"], state["bits"],
                                  state["group_size"], state["in_features"])
    return F.linear(x, w.to(x.dtype))


# ----------------------------------------------------------------------------------------------


def _time_interleaved(
    cases: Dict[str, Callable[[], torch.Tensor]], iters: int, warmup: int = 2
) -> Dict[str, Dict[str, float]]:
    """Median and min milliseconds per case over ``iters`` rounds; each round runs every case once,
    the order rotating from round to round."""
    names = list(cases)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_ in range(warmup + iters):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            cases[name]()
            if round_ >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v)} for name, v in samples.items()}


def _quantized(out_f: int, in_f: int, group_size: int) -> QuantizedWeight:
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f) * 0.02
    codes, scale, zero = quantize_weight(weight, QuantParams(4, group_size, "sym"))
    return QuantizedWeight(codes, scale, zero, 4, group_size, True)


def _layer(qw: QuantizedWeight, backend: str) -> QuantLinear:
    layer = QuantLinear.from_quantized(qw, "auto_round:auto_gptq", backend=backend)
    layer.post_init()
    return layer


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_block(state, x):
    old = backends.CPU_BLOCK_WEIGHTS
    backends.CPU_BLOCK_WEIGHTS = 1 << 62
    try:
        return backends._torch_matmul(state, x)
    finally:
        backends.CPU_BLOCK_WEIGHTS = old


def bench_layer(name: str, out_f: int, in_f: int, group_size: int, tokens: List[int], iters: int) -> dict:
    qw = _quantized(out_f, in_f, group_size)
    w_bf16 = qw.dequantize(torch.bfloat16)
    int4, plain, cached = (_layer(qw, b) for b in ("cpu_int4", "torch", "torch_cached"))
    buffers = _nbytes(*plain.buffers())
    rows = []
    for n in tokens:
        x = torch.randn(n, in_f, dtype=torch.bfloat16)
        ref = F.linear(x.float(), w_bf16.float())
        cases = {
            "bf16 F.linear": lambda x=x: F.linear(x, w_bf16),
            "cpu_int4": lambda x=x: int4(x),
            "torch": lambda x=x: plain(x),
            "torch (one block)": lambda x=x: _one_block(plain._state, x),
            "torch (former)": lambda x=x: _former_torch_matmul(plain._state, x),
            "torch_cached": lambda x=x: cached(x),
        }
        with torch.no_grad():
            cached(x)  # builds the cached weight outside the timed rounds
            timings = _time_interleaved(cases, iters)
            former = _former_torch_matmul(plain._state, x)
            base = timings["bf16 F.linear"]["median_ms"]
            for case, fn in cases.items():
                y = fn()
                rows.append({
                    "case": case,
                    "tokens": n,
                    "median_ms": round(timings[case]["median_ms"], 3),
                    "min_ms": round(timings[case]["min_ms"], 3),
                    "x_bf16_median": round(timings[case]["median_ms"] / base, 2),
                    "rel_err_vs_fp32": float((y.float() - ref).abs().max() / ref.abs().max()),
                    "equals_former_torch": bool(torch.equal(y, former)),
                })
    weight_bytes = {
        "bf16 weight": out_f * in_f * 2,
        "checkpoint buffers (qweight, qzeros, scales)": buffers,
        "torch: buffers + unpacked zeros": buffers + _nbytes(plain._state["zeros"]),
        "cpu_int4: buffers + int4 copy + scales/zeros":
            buffers + _nbytes(int4._state["packed"], int4._state["sz_float32"]),
        "torch_cached: buffers + unpacked zeros + bf16 weight":
            buffers + _nbytes(plain._state["zeros"], cached._state["weight"]),
    }
    return {
        "layer": f"{name} W4G{group_size} sym (out x in)",
        "out_features": out_f,
        "in_features": in_f,
        "padded_last_group": in_f % group_size != 0,
        "backend_auto": backends.select_backend("cpu", 4, group_size, in_f, out_f).name,
        "weight_bytes": weight_bytes,
        "rows": rows,
    }


def crossover(tokens_by_dtype: Dict[torch.dtype, List[int]], iters: int) -> List[dict]:
    """int4 kernel vs the torch path vs the dense matmul at 4096x4096 W4G128, per input dtype."""
    qw = _quantized(4096, 4096, 128)
    int4 = _layer(qw, "cpu_int4")
    state = int4._state
    out = []
    for dtype, counts in tokens_by_dtype.items():
        dense = qw.dequantize(dtype)
        key = f"sz_{str(dtype).split('.')[-1]}"
        state.setdefault(key, state["sz_float32"].to(dtype))
        for n in counts:
            x = torch.randn(n, 4096, dtype=dtype)
            cases = {
                "int4 kernel": lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, state["packed"], 128, state[key]),
                "torch path": lambda x=x: backends._torch_matmul(state["dequant"], x),
                "dense F.linear": lambda x=x: F.linear(x, dense),
            }
            with torch.no_grad():
                t = _time_interleaved(cases, iters)
            row = {"dtype": str(dtype).split(".")[-1], "tokens": n}
            row.update({k: round(v["median_ms"], 3) for k, v in t.items()})
            out.append(row)
            print(f"  {row['dtype']:>8} {n:>4} tok  int4 kernel {row['int4 kernel']:9.2f}"
                  f"  torch path {row['torch path']:9.2f}  dense {row['dense F.linear']:8.2f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--crossover", action="store_true",
                        help="also time the int4 kernel against the torch path per dtype (for CPU_INT4_MAX_TOKENS)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    layers = []
    for name, out_f, in_f in LAYERS:
        result = bench_layer(name, out_f, in_f, args.group_size, args.tokens, args.iters)
        layers.append(result)
        print(f"\n{result['layer']}  (auto picks {result['backend_auto']})")
        print(f"{'tokens':>6}  {'case':<18} {'median ms':>10} {'min ms':>9} {'x bf16':>7} {'rel.err':>9}  = former")
        for r in result["rows"]:
            print(f"{r['tokens']:>6}  {r['case']:<18} {r['median_ms']:10.3f} {r['min_ms']:9.3f}"
                  f" {r['x_bf16_median']:7.2f} {r['rel_err_vs_fp32']:9.2e}"
                  f"  {'yes' if r['equals_former_torch'] else 'no'}")
        print("  bytes:", ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in result["weight_bytes"].items()))
    result = {
        "what": "median ms per call, one quantized linear layer on CPU, bf16 input (see bench/bench_qlinear.py)",
        "command": "bench/bench_qlinear.py " + " ".join(
            [f"--tokens {' '.join(map(str, args.tokens))}", f"--iters {args.iters}", f"--threads {args.threads}"]
            + (["--crossover"] if args.crossover else [])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "cpu_block_weights": backends.CPU_BLOCK_WEIGHTS,
        "cpu_int4_max_tokens": {str(k).split(".")[-1]: v for k, v in backends.CPU_INT4_MAX_TOKENS.items()},
        "layers": layers,
    }
    if args.crossover:
        print("\ncrossover, 4096x4096 W4G128, median ms")
        result["crossover"] = crossover({torch.bfloat16: [16, 32, 64, 96, 128, 256],
                                         torch.float16: [1, 2, 4], torch.float32: [1, 2, 4]}, max(5, args.iters // 2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
