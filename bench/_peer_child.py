"""The GPTQModel side of ``bench/bench_peers.py``, run in ``.venv-peers`` (``make peers-venv``).

    .venv-peers/bin/python bench/_peer_child.py SPEC.json OUT.json

It imports torch, transformers, gptqmodel and awq only (never ``auto_round``), so what it writes and reads is
those tools' own doing. ``SPEC.json``:

- ``{"job": "quantize", "tool": "gptqmodel" | "autoawq", "model": folder, "out": folder, "config": ...,
  "calib": {"n", "len", "vocab", "seed", "chat"}}``: GPTQModel (``config``: QuantizeConfig keywords) or AutoAWQ
  (``config``: its ``quant_config``) quantizes ``model`` on CPU with random-token calibration rows, saves ``out``.
- ``{"job": "probe", "folder": folder, "loader": "gptqmodel" | "hf", "ids": ids.pt, "tensors": out.pt}``:
  loads ``folder`` with ``GPTQModel.load`` (its torch kernel) or transformers' ``from_pretrained`` (which hands
  GPTQ checkpoints to gptqmodel), and saves the logits on ``ids`` (loaded in bf16) and each quantized module's
  weight as the module computes it (loaded in fp16: ``module(I)`` for the identity ``I``, exact in fp16).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(len(os.sched_getaffinity(0))))  # its default wants 2+ cores


def quantize(spec):
    import torch

    c = spec["calib"]
    g = torch.Generator().manual_seed(c["seed"])
    rows = [torch.randint(0, c["vocab"], (c["len"],), generator=g) for _ in range(c["n"])]
    if spec.get("tool", "gptqmodel") == "autoawq":
        from awq import AutoAWQForCausalLM
        from transformers import AutoTokenizer

        model = AutoAWQForCausalLM.from_pretrained(spec["model"], device_map="cpu")
        tok = AutoTokenizer.from_pretrained(spec["model"])
        t0 = time.perf_counter()
        model.quantize(tok, quant_config=spec["config"], calib_data=[tok.decode(r) for r in rows],
                       max_calib_samples=c["n"], max_calib_seq_len=c["len"], n_parallel_calib_samples=4)
        seconds = time.perf_counter() - t0
        model.save_quantized(spec["out"])
        tok.save_pretrained(spec["out"])  # AutoAWQ saves no tokenizer; GPTQModel's loader wants one
    else:
        from gptqmodel import GPTQModel, QuantizeConfig

        model = GPTQModel.load(spec["model"], QuantizeConfig(**spec["config"]), device="cpu")
        if c.get("chat"):  # VLM definitions take conversations (text-only here), through the model's processor
            tok = model.tokenizer
            calib = [[{"role": "user", "content": [{"type": "text", "text": tok.decode(r)}]}] for r in rows]
        else:
            calib = [{"input_ids": r.tolist(), "attention_mask": [1] * c["len"]} for r in rows]
        t0 = time.perf_counter()
        model.quantize(calib, batch_size=4)
        seconds = time.perf_counter() - t0
        model.save(spec["out"])
    qc = json.loads((Path(spec["out"]) / "config.json").read_text())["quantization_config"]
    qc.pop("meta", None)
    return {"quantize_s": round(seconds, 2), "quantization_config": qc}


def _quantized_modules(model):
    import torch.nn as nn

    return {n: m for n, m in model.named_modules()
            if hasattr(m, "qweight") and hasattr(m, "in_features") and not isinstance(m, nn.Linear)}


def _load(spec, dtype):
    import torch

    if spec["loader"] == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(spec["folder"], device="cpu", backend=BACKEND.TORCH, dtype=dtype).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=dtype, device_map="cpu")


def probe(spec):
    import torch

    ids = torch.load(spec["ids"])
    out = {"weights": {}}
    with torch.no_grad():
        out["logits"] = _load(spec, torch.bfloat16)(input_ids=ids).logits.float()
        model = _load(spec, torch.float16)
        for name, module in _quantized_modules(model).items():
            eye = torch.eye(module.in_features, dtype=torch.float16)
            w = module(eye)
            if getattr(module, "bias", None) is not None:
                w = w - module.bias.to(w.dtype)
            out["weights"][name] = w.t().float().contiguous()
    torch.save(out, spec["tensors"])
    kinds = sorted({type(m).__name__ for m in _quantized_modules(model).values()})
    return {"modules": len(out["weights"]), "module_classes": kinds, "model_class": type(model).__name__}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2]).resolve()
    os.chdir(out.parent)  # GPTQModel writes a logs/ folder into the working directory
    try:
        rec = {"quantize": quantize, "probe": probe}[spec["job"]](spec)
    except Exception as err:  # the record carries the failure; the parent reports it per case
        rec = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    out.write_text(json.dumps(rec, indent=2, default=str))


if __name__ == "__main__":
    main()
