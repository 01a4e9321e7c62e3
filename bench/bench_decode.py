"""Decode speed of reloaded 4-bit models on CPU, per backend, against the bf16 model; file sizes per format.

Models: the real SmolLM2-135M-Instruct and a random Llama-shaped mid-size model (hidden 1024, 8
blocks; ``_common.mid_llama_dir``). Each is quantized once (W4 sym, plain RTN: the speed does not
depend on the tuning; group 128, but 64 for SmolLM2, whose 576-wide inputs a group of 128 does not
divide and formats other than ``auto_round`` need one group size for every layer) and written in every integer format from that one run (``auto_round``,
``auto_gptq``, ``auto_awq``, ``llm_compressor``), plus ``gguf:q4_k_m`` from its own run, and for a
model with an untied ``lm_head`` (the mid-size one) also with ``quant_lm_head=True``; the model is
held in bf16 (``model_dtype='bf16'``), so the FP tensors are written in bf16; sizes are the bytes of
each folder's weight files.

Cases, all loaded in this one process and timed in interleaved rounds (each round runs every case
once, in a rotating order, so load from other processes hits them alike; medians reported):
``bf16`` (the full-precision model in bf16: the speed to beat), and the ``auto_round`` folder
reloaded with ``load_quantized(backend=...)`` for ``auto`` (torch's int4 CPU kernel where it can
serve the layer and the call, else the ``torch`` path), ``torch`` and ``torch_cached``, and ``auto,
lm_head W4`` where the lm_head is quantized too; activations bf16. Per case: prefill time of a ``--prompt`` token prompt (one forward), and decode tokens/s at
batch 1 (greedy ``generate`` of ``--new-tokens`` tokens, prefill subtracted). The backend chosen
for each layer under ``auto`` is counted.

    .venv/bin/python bench/bench_decode.py [--models smollm2 mid] [--rounds 5] [--threads 2]
    .venv/bin/python bench/bench_decode.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORK, fmt, log, machine_info, mid_llama_dir, parse_bench_args, print_table, smollm2_dir, write_json  # noqa: E402

NAME = "decode"
FORMATS = ("auto_round", "auto_gptq", "auto_awq", "llm_compressor")
BACKENDS = ("auto", "torch", "torch_cached")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "mid"], choices=["smollm2", "mid"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    return parse_bench_args(p, argv, NAME, "smollm2 only, 2 rounds, 8 new tokens",
                            {"models": ["smollm2"], "rounds": 2, "new_tokens": 8, "prompt": 32})


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".gguf"))


GROUP = {"smollm2": 64, "mid": 128}


def quantize(model_dir: Path, out: Path, group_size: int) -> dict:
    """Folders per format (one RTN run for the integer formats, one for q4_k_m) and their weight bytes."""
    from auto_round import AutoRound

    import json

    folders = {}
    tied = bool(json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", True))
    if not (out / ".complete").is_file():
        common = {"bits": 4, "group_size": group_size, "sym": True, "iters": 0, "disable_opt_rtn": True,
                  "model_dtype": "bf16"}
        AutoRound(str(model_dir), **common).quantize_and_save(str(out / "int"), format=",".join(FORMATS),
                                                              overwrite=True)
        if not tied:
            AutoRound(str(model_dir), **common, quant_lm_head=True).quantize_and_save(
                str(out / "lm_head"), format="auto_round", overwrite=True)
        AutoRound(str(model_dir), iters=0, disable_opt_rtn=True, model_dtype="bf16").quantize_and_save(
            str(out / "gguf"), format="gguf:q4_k_m", overwrite=True)
        (out / ".complete").write_text("ok\n")
    for fmt_name in FORMATS:
        sub = out / "int" / fmt_name.replace(":", "-")
        folders[fmt_name] = sub if sub.is_dir() else out / "int"
    folders["gguf:q4_k_m"] = out / "gguf"
    if not tied:
        folders["auto_round, lm_head W4"] = out / "lm_head"
    return folders


def time_case(model, ids, new_tokens: int) -> tuple:
    """(prefill seconds, decode tokens/s) of one greedy generation at batch 1."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return prefill, (new_tokens - 1) / max(total - prefill, 1e-9)


def backend_counts(model) -> dict:
    from auto_round.inference.qlinear import QuantLinear

    return dict(Counter(getattr(m, "backend_name", None) or getattr(m, "backend", "?")
                        for m in model.modules() if isinstance(m, QuantLinear)))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from auto_round.inference import load_quantized

    torch.set_num_threads(args.threads)
    record = {"benchmark": NAME, "machine": machine_info(), "settings": vars(args).copy(), "models": {}}
    record["settings"].pop("json", None)
    rows, size_rows = [], []
    for key in args.models:
        model_dir = smollm2_dir() if key == "smollm2" else mid_llama_dir()
        log(f"{key}: quantize and export")
        folders = quantize(model_dir, WORK / NAME / key, GROUP[key])
        sizes = {"bf16 (source, as bf16)": None, **{f: weight_bytes(p) for f, p in folders.items()}}
        cases = {"bf16": AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()}
        n_params = sum(p.numel() for p in cases["bf16"].parameters())
        sizes["bf16 (source, as bf16)"] = 2 * n_params
        for b in BACKENDS:
            cases[b] = load_quantized(str(folders["auto_round"]), backend=b, dtype=torch.bfloat16).eval()
        if "auto_round, lm_head W4" in folders:  # an untied lm_head: also quantized (quant_lm_head=True)
            cases["auto, lm_head W4"] = load_quantized(str(folders["auto_round, lm_head W4"]), backend="auto",
                                                       dtype=torch.bfloat16).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 1000, (1, args.prompt), generator=g)
        for m in cases.values():  # warm-up (first calls choose backends, prepare kernels and caches)
            time_case(m, ids[:, :8], 2)
        counts = backend_counts(cases["auto"])
        samples = {c: [] for c in cases}
        names = list(cases)
        for r in range(args.rounds):
            for c in names[r % len(names):] + names[:r % len(names)]:
                samples[c].append(time_case(cases[c], ids, args.new_tokens))
        res = {}
        for c, vals in samples.items():
            res[c] = {"prefill_s": statistics.median(v[0] for v in vals),
                      "decode_tok_s": statistics.median(v[1] for v in vals), "samples": vals}
        base = res["bf16"]["decode_tok_s"]
        for c, v in res.items():
            v["decode_vs_bf16"] = v["decode_tok_s"] / base
            rows.append([key, c, fmt(v["prefill_s"] * 1000, ".0f"), fmt(v["decode_tok_s"], ".1f"),
                         fmt(v["decode_vs_bf16"], ".2f") + "x"])
        for f, n in sizes.items():
            size_rows.append([key, f, fmt(n / 2**20, ".1f")])
        record["models"][key] = {"group_size": GROUP[key], "params": n_params, "cases": res, "sizes_bytes": sizes, "auto_backends": counts}
        log(f"  auto backends per layer: {counts}")
        del cases
    table = print_table(["model", "case", f"prefill {args.prompt} tok ms", "decode tok/s", "vs bf16"], rows,
                        f"decode at batch 1, {args.new_tokens} new tokens, bf16 activations, {args.threads} "
                        f"threads, median of {args.rounds} interleaved rounds; load average "
                        f"{fmt(record['machine']['load_average'][0], '.1f')}")
    sizes_table = print_table(["model", "format", "weights MiB"], size_rows, "file sizes (W4 sym, group 64 for smollm2, 128 for mid; q4_k_m)")
    record["table"], record["sizes_table"] = table, sizes_table
    write_json(NAME, record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
