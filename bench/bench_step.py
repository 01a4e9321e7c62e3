"""Where one tuning step's time goes, against this machine's own matmul rate at the same shapes.

One decoder block (block 0 of the real SmolLM2-135M-Instruct, and of the random mid-size Llama of
``_common.mid_llama_dir``) is wrapped as ``tune_unit`` wraps it (``TunableLinear`` for each of its
seven linear layers, min-max tuning on, float32) and fed a batch of ``--batch`` x ``--seqlen``
tokens captured at its input. One step is timed whole, and in its parts, each in isolation, in
interleaved rounds (medians):

- ``qdq``: the seven qdq weights from ``V``/``alpha``/``beta`` (with the autograd graph, as in the step);
- ``forward``: the block's forward on those weights (step forward minus ``qdq``);
- ``backward``: ``loss.backward()`` through the block and the qdq;
- ``sign step``: ``p -= lr * sign(grad)`` with clamping, gradients zeroed;
- ``FP targets``: the full-precision forward of one batch (once per block per sample, not per step:
  its share of a step is ``nsamples / (iters * batch)`` batches, in the JSON for 128 samples and 200
  iterations at this batch size);
- ``matmuls``: what the step's GEMMs alone cost at the same shapes: for each linear, the forward
  ``x W^T`` and the two backward products (``dY W`` and ``dY^T x``), plus the attention's scaled
  dot-product forward and backward, all in float32 on random tensors.

The step's FLOPs (``6 * tokens * linear params`` plus attention) over its time give the achieved
GFLOP/s, against the same FLOPs over the ``matmuls`` time (the machine's rate at these shapes,
measured in the same run). Target (issue 13): the step within 1.5x of its own matmul time.

    .venv/bin/python bench/bench_step.py [--models smollm2 mid] [--batch 4] [--seqlen 256] [--rounds 7]
    .venv/bin/python bench/bench_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt, log, machine_info, mid_llama_dir, parse_bench_args, print_table, smollm2_dir, write_json  # noqa: E402

NAME = "step"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "mid"], choices=["smollm2", "mid"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    return parse_bench_args(p, argv, NAME, "smollm2, batch 2 x 64, 2 rounds",
                            {"models": ["smollm2"], "batch": 2, "seqlen": 64, "rounds": 2})


def capture_block0(model, batch: int, seqlen: int):
    """``(block, hidden, kwargs)``: decoder block 0 and its input for random token ids."""
    import torch

    block = model.model.layers[0]
    seen = {}

    def hook(_mod, args, kwargs):
        seen["hidden"], seen["kwargs"] = args[0].detach(), {k: v for k, v in kwargs.items()}
        raise StopIteration

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (batch, seqlen), generator=g)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except StopIteration:
        pass
    finally:
        h.remove()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return block, seen["hidden"], kwargs


def median_time(fn, rounds: int) -> float:
    vals = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        vals.append(time.perf_counter() - t0)
    return statistics.median(vals)


def measure(model_dir: Path, args) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from auto_round.quant.qdq import QuantParams
    from auto_round.tuning.block import LOSS_SCALE, UnitInputs, _sign_step, run_unit, squared_error
    from auto_round.tuning.wrapper import TunableLinear, set_module

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cfg = model.config
    block, hidden, kwargs = capture_block0(model, args.batch, args.seqlen)
    for p in block.parameters():
        p.requires_grad_(False)
    extra = UnitInputs([()], [kwargs], None)
    with torch.no_grad():
        target = run_unit([block], hidden, extra).detach()
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    wrappers = {}
    for n in names:
        lin = block.get_submodule(n)
        # group 128, or 64 where 128 does not divide the inputs (what the plan's group fitting picks)
        params = QuantParams(bits=4, group_size=128 if lin.in_features % 128 == 0 else 64, scheme="sym")
        w = TunableLinear(lin, params, True, torch.float32)
        set_module(block, n, w)
        wrappers[n] = w
    tokens = args.batch * args.seqlen
    lin_params = sum(w.weight.numel() for w in wrappers.values())
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    attn_flops = 4 * args.batch * args.seqlen ** 2 * heads * hd  # QK^T and PV, forward
    flops = 3 * (2 * tokens * lin_params + attn_flops)  # forward + backward (2x)

    def qdq():
        return [w.qdq() for w in wrappers.values()]

    def forward_loss():
        out = run_unit([block], hidden, extra)
        sq, _ = squared_error(out, target, None)
        return sq.mul(LOSS_SCALE)

    def step():
        forward_loss().backward()
        _sign_step(list(wrappers.values()), 1e-3, 1e-3)

    def only_forward():
        with torch.enable_grad():
            loss = forward_loss()
        del loss
        for w in wrappers.values():
            w._cache = None

    def only_qdq():
        with torch.enable_grad():
            ws = qdq()
        del ws
        for w in wrappers.values():
            w._cache = None

    state = {}

    def prepare_backward():
        state["loss"] = forward_loss()

    def only_backward():
        state.pop("loss").backward()

    def only_sign():
        _sign_step(list(wrappers.values()), 1e-3, 1e-3)

    def fp_target():
        with torch.no_grad():
            for n, w in wrappers.items():
                set_module(block, n, w.linear)
            try:
                run_unit([block], hidden, extra)
            finally:
                for n, w in wrappers.items():
                    set_module(block, n, w)

    g = torch.Generator().manual_seed(1)
    mats = []
    for w in wrappers.values():
        out_f, in_f = w.weight.shape
        x = torch.randn(tokens, in_f, generator=g)
        wt = torch.randn(out_f, in_f, generator=g)
        dy = torch.randn(tokens, out_f, generator=g)
        mats.append((x, wt, dy))
    q = torch.randn(args.batch, heads, args.seqlen, hd, generator=g, requires_grad=True)
    k = torch.randn(args.batch, heads, args.seqlen, hd, generator=g, requires_grad=True)
    v = torch.randn(args.batch, heads, args.seqlen, hd, generator=g, requires_grad=True)
    do = torch.randn(args.batch, heads, args.seqlen, hd, generator=g)

    def matmuls():
        for x, wt, dy in mats:
            F.linear(x, wt)
            dy @ wt
            dy.t() @ x
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    for fn in (step, only_qdq, only_forward, fp_target, matmuls):  # warm-up
        fn()
    parts = {"step": [], "qdq": [], "forward (with qdq)": [], "backward": [], "sign step": [], "FP target (1 batch)": [],
             "matmuls": []}
    for r in range(args.rounds):
        cases = [("step", step, None), ("qdq", only_qdq, None), ("forward (with qdq)", only_forward, None),
                 ("backward", only_backward, prepare_backward), ("sign step", only_sign, prepare_backward),
                 ("FP target (1 batch)", fp_target, None), ("matmuls", matmuls, None)]
        cases = cases[r % len(cases):] + cases[:r % len(cases)]
        for key, fn, prep in cases:
            if prep is not None:
                prep()
                if key == "sign step":
                    state.pop("loss").backward()
            parts[key].append(median_time(fn, 1))
    med = {k: statistics.median(v) for k, v in parts.items()}
    med["forward (block only)"] = max(med["forward (with qdq)"] - med["qdq"], 0.0)
    return {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "tokens": tokens,
            "linear_params": lin_params, "step_gflop": flops / 1e9, "seconds": med, "samples": parts,
            "step_gflops_per_s": flops / med["step"] / 1e9, "matmul_gflops_per_s": flops / med["matmuls"] / 1e9,
            "step_over_matmuls": med["step"] / med["matmuls"],
            # FP targets of 128 samples once per block, over 200 steps of this batch size
            "fp_target_share_default": med["FP target (1 batch)"] * 128 / args.batch / 200 / med["step"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    record = {"benchmark": NAME, "machine": machine_info(), "settings": {k: v for k, v in vars(args).items()
                                                                         if k != "json"}, "models": {}}
    rows = []
    for key in args.models:
        log(f"{key}: block 0, batch {args.batch} x {args.seqlen}")
        res = measure(smollm2_dir() if key == "smollm2" else mid_llama_dir(), args)
        record["models"][key] = res
        sec = res["seconds"]
        for part in ("step", "qdq", "forward (block only)", "backward", "sign step", "FP target (1 batch)", "matmuls"):
            rows.append([key, part, fmt(sec[part] * 1000, ".1f"), fmt(100 * sec[part] / sec["step"], ".0f") + "%"])
        rows.append([key, "step GFLOP/s | matmul GFLOP/s", fmt(res["step_gflops_per_s"], ".1f"),
                     fmt(res["matmul_gflops_per_s"], ".1f")])
        rows.append([key, "step / its matmuls", fmt(res["step_over_matmuls"], ".2f") + "x", "target <= 1.5x"])
    table = print_table(["model", "part", "ms", "of step"], rows,
                        f"one tuning step of decoder block 0 (W4 sym G128/G64, min-max on, fp32), batch {args.batch} x "
                        f"{args.seqlen} tokens, {args.threads} threads, median of {args.rounds} interleaved rounds; "
                        f"load average {fmt(record['machine']['load_average'][0], '.1f')}")
    record["table"] = table
    write_json(NAME, record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
