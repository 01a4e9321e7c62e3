"""Our VLM GGUF pair (text ``<name>-<TYPE>.gguf`` + ``mmproj-<name>-F16.gguf``) in llama.cpp's mtmd.

For each model: quantize the language model (AutoRoundMLLM, ``gguf:<type>``), export, then in
llama.cpp (llama-cpp-python's ``mtmd_cpp``): load the mmproj against the text file, encode one test
image (raw RGB of the exact size the model's processor produces, so no resize happens on either side)
and compare the image embeddings llama.cpp computes with our model's projector output for the same
image (``model.model.get_image_features``), then generate a few tokens greedily from a prompt with
the image in it. Prints a table and writes ``bench/results/gguf_mmproj.json``.

Expected agreement: fp16 rounding of the vision weights (the mmproj is F16) and ggml's kernels
(ggml's gelu is the tanh approximation). The ``vs ours (fp16 weights)`` column compares against our
model with those weights rounded to fp16. LLaVA (CLIP towers) has a known llama.cpp defect:
``tools/mtmd/models/llava.cpp`` appends the CLS embedding AFTER the patches while clip.cpp's inputs
still assume CLS first (ggml-org/llama.cpp#25814, fix in PR #25844), so llama.cpp's LLaVA
embeddings differ from transformers' for every correct file; the ``vs CLS-last emulation`` column
runs our model with that same ordering to show that everything else in our file agrees.
Qwen2.5-VL: llama.cpp's qwen2.5vl graph (clip.cpp 0c1e570) always windows its window-attention blocks by
112 pixels and reads no key for it, so the exporter refuses other windows (the seed zoo's tiny model has 28)
and this bench uses the 112-pixel variant of ``tests/tiny_vlms_gguf.py`` on a 224x224 image (4 windows).
Run on the 28-pixel model, llama.cpp's embeddings differed from transformers' by 8.3e-4 (of 0.098) and
equalled ours run with a 112 window to 3.9e-5: that was the 2026-12 "unexplained gap".

Gemma-3, LLaVA-NeXT and Mistral-3 use the variants of ``tests/tiny_vlms_gguf.py`` (the seed zoo's are
shaped so that llama.cpp cannot run them; the exporter refuses those). Their next-token logits are
compared on llama.cpp's own token sequence (its image positions filled with the image token, and
Mistral-3's with [IMG] / [IMG_BREAK] in the processor's layout), as mtmd's image markers differ from the
processors'. LLaVA-NeXT: mtmd encodes each AnyRes tile (row by row) and then the overview as separate
images of ``(image_size / patch_size)^2`` tokens, without transformers' unpadding and ``image_newline``
rows and in another order (transformers: overview first; a llama.cpp limitation: 20 image tokens here
against transformers' 24), so each of its images is compared with our projector output for the same
tile and no logits are compared; a CLIP tower also has llava's CLS-last defect (emulation column).

llama-cpp-python is not a project dependency: the llama.cpp side runs in ``.venv-llamacpp``
(``python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python==0.3.36
numpy``) unless the running Python has ``llama_cpp``.

    .venv/bin/python bench/bench_gguf_mmproj.py                  # tiny llava, qwen2_vl, qwen2_5_vl + demo
    .venv/bin/python bench/bench_gguf_mmproj.py --models llava qwen2_vl --type q8_0
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the demo package (demo/) beside src/
RESULTS = ROOT / "bench" / "results" / "gguf_mmproj.json"
WORK = ROOT / ".cache" / "bench" / "gguf_mmproj"
DEFAULT_LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
TINY = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3", "llava_next", "mistral3")
GGUF_VARIANTS = ("gemma3", "llava_next", "llava_next_siglip", "mistral3")  # from tests/tiny_vlms_gguf.py
# Images of the size each processor keeps as it is (llama.cpp's qwen2vl graph needs >= 8 tokens, its pixtral
# preprocessing >= 8 too; a LLaVA-NeXT image of a pinpoint's size is cut into tiles without resizing).
IMAGE_SIZES = {"llava": (28, 28), "qwen2_vl": (112, 112), "qwen2_5_vl": (224, 224), "demo": (64, 64),
               "idefics3": (64, 64), "smolvlm": (64, 64), "gemma3": (56, 56), "llava_next": (56, 56),
               "llava_next_siglip": (56, 56), "mistral3": (112, 112)}


# ------------------------------------------------------------------ llama.cpp side (numpy + llama_cpp only)
def _no_extra_buffer_types(llama_cpp) -> None:
    """Load models without ggml's extra (repacking) buffer types: on CPUs that report AMX where the
    kernel does not enable it, ggml's AMX matmul (``ggml_backend_amx_mul_mat``) segfaults on the
    first decode. llama-cpp-python's ``Llama`` does not expose ``use_extra_bufts``, so its default
    model params are wrapped."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def llamacpp_worker(text_path: str, mm_path: str, request_path: str, out_path: str) -> None:
    """Image embeddings from mtmd for one raw RGB image, and greedy tokens after a prompt with it."""
    import numpy as np
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    _no_extra_buffer_types(llama_cpp)
    req = json.loads(Path(request_path).read_text())
    raw = np.load(req["image"])  # uint8 [h, w, 3]
    llm = llama_cpp.Llama(model_path=text_path, n_ctx=512, n_batch=512, verbose=bool(req.get("verbose")), n_threads=2)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = mtmd.mtmd_init_from_file(mm_path.encode(), llm.model, params)
    if not ctx:
        raise SystemExit("mtmd_init_from_file failed")
    h, w, _ = raw.shape
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * raw.size).from_buffer_copy(raw.tobytes()))
    marker = mtmd.mtmd_default_marker()
    prompt = req["prompt"].replace("<image>", marker.decode()).encode()
    text = mtmd.mtmd_input_text()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
    chunks = mtmd.mtmd_input_chunks_init()
    rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    if rc != 0:
        raise SystemExit(f"mtmd_tokenize returned {rc}")
    n_embd, embds, t0 = llm.n_embd(), [], time.perf_counter()
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise SystemExit("mtmd_encode_chunk failed")
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            embds.append(np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
                         .reshape(n, n_embd).copy())
    encode_s = time.perf_counter() - t0
    prompt_ids: List[int] = []  # -1 at image positions
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            prompt_ids += [int(ids[j]) for j in range(n.value)]
        else:
            prompt_ids += [-1] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
    np.save(out_path, np.stack(embds))  # [n_images (tiles), n_tokens, d], saved before the decoding
    info = {"encode_s": encode_s, "n_images": len(embds), "prompt_ids": prompt_ids}
    Path(out_path + ".json").write_text(json.dumps(info))
    n_past = llama_cpp.llama_pos(0)
    rc = mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
    if rc != 0:
        raise SystemExit(f"mtmd_helper_eval_chunks returned {rc}")
    n_vocab = llm.n_vocab()

    def last_logits() -> "np.ndarray":
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

    first_logits = last_logits()
    tokens: List[int] = []
    for _ in range(int(req["new_tokens"])):  # greedy
        tokens.append(int(np.argmax(last_logits())))
        one = (llama_cpp.llama_token * 1)(tokens[-1])
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
            raise SystemExit("llama_decode failed while generating")
    np.save(out_path + ".logits.npy", first_logits)
    info.update(tokens=tokens, text=llm.detokenize(tokens).decode("utf-8", "replace"))
    Path(out_path + ".json").write_text(json.dumps(info))
    mtmd.mtmd_free(ctx)


def llamacpp_python(requested: Optional[Path] = None) -> Optional[str]:
    """A Python that imports llama_cpp: this one, else ``requested`` / ``.venv-llamacpp``'s, else None."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    path = Path(requested or DEFAULT_LLAMACPP_PYTHON)
    probe = [str(path), "-c", "import llama_cpp.mtmd_cpp"]
    if path.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(path)
    return None


def run_llamacpp(python: str, text_path: Path, mm_path: Path, image, prompt: str, work: Path,
                 new_tokens: int = 6) -> Dict[str, Any]:
    """Run :func:`llamacpp_worker` in ``python``; ``{"embd": [n_images, n, d], "tokens", "text", ...}``
    or ``{"error"}`` (an image split into tiles by llama.cpp gives one entry per tile)."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "image.npy", np.asarray(image.convert("RGB"), dtype=np.uint8))
    req, out = work / "request.json", work / "embd.npy"
    for stale in (out, Path(str(out) + ".json"), Path(str(out) + ".logits.npy")):
        stale.unlink(missing_ok=True)
    req.write_text(json.dumps({"image": str(work / "image.npy"), "prompt": prompt, "new_tokens": new_tokens}))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--llamacpp-worker", str(text_path), str(mm_path),
                           str(req), str(out)], capture_output=True, text=True)
    if not out.exists():
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    got = {"embd": np.load(out), **json.loads(Path(str(out) + ".json").read_text())}
    if proc.returncode != 0 or "tokens" not in got:  # encoded, but decoding the prompt failed
        got["eval_error"] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "GGML_ASSERT" in ln
                             or "Error" in ln][-1:] or (proc.stdout + proc.stderr)[-300:]
    else:
        got["logits"] = np.load(str(out) + ".logits.npy")
    return got


# ------------------------------------------------------------------ our side
def as_in_files(model, quantized: "Any"):
    """A copy of ``model`` with every matrix the files keep as F16 rounded through fp16: the vision
    matrices (the mmproj is F16, position embeddings F32) and the text ones not quantized (token_embd,
    output); the quantized layers already hold the weights the text file stores."""
    import copy

    import torch

    keep = {f"{n}.weight" for n in quantized}
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1 and name not in keep and not name.endswith("position_embedding.weight"):
                p.copy_(p.half().float())
    return m


def our_image_features(model, inputs) -> "Any":
    """``[n_tokens, d]`` projector output of our model for the processed image."""
    import torch

    kw = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask") if k in inputs}
    with torch.no_grad():
        out = model.model.get_image_features(**kw)
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out), 0) if isinstance(out, (list, tuple)) else out
    return out.reshape(-1, out.shape[-1]).float().numpy()


def llava_next_tile_features(model, inputs) -> "Any":
    """``[n_tiles, n, d]``: our LLaVA-NeXT projector output for each AnyRes image (the overview first,
    then the tiles row by row), before transformers packs them (unpadding, ``image_newline``)."""
    import torch

    cfg = model.config
    layers = cfg.vision_feature_layer
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True)
        hs = [out.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        x = torch.cat(hs, -1)
        if cfg.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        return model.model.multi_modal_projector(x).float().numpy()


def pixtral_features_with_breaks(model, inputs, tokenizer) -> "Any":
    """``[n, d]``: our Mistral-3 projector output laid out as the processor lays out the image tokens,
    each row of [IMG] followed by [IMG_BREAK]'s embedding except the last (llama.cpp's output; the
    [IMG_END] that follows is a text token on both sides)."""
    import torch

    cfg = model.config
    h, w = (int(x) for x in inputs["image_sizes"][0])
    per = cfg.vision_config.patch_size * cfg.spatial_merge_size
    rows, cols = h // per, w // per
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                              image_sizes=inputs["image_sizes"]).pooler_output))
        brk = model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("[IMG_BREAK]")].float()
    out = []
    for r in range(rows):
        out.append(feats[r * cols:(r + 1) * cols].float())
        if r < rows - 1:
            out.append(brk[None])
    return torch.cat(out).detach().numpy()


def image_token_fill(model, tokenizer, n: int, inputs) -> List[int]:
    """The token ids transformers has at llama.cpp's ``n`` image positions: the image token, and for
    Mistral-3 its rows separated by [IMG_BREAK]."""
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    if cfg.model_type != "mistral3":
        return [image_id] * n
    cols = int(inputs["image_sizes"][0][1]) // (cfg.vision_config.patch_size * cfg.spatial_merge_size)
    brk = tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
    return [brk if (i + 1) % (cols + 1) == 0 else image_id for i in range(n)]


def compare_logits_on_ids(model, tokenizer, inputs, got: Dict[str, Any]) -> Dict[str, Any]:
    """Our model on llama.cpp's exact token sequence (its image positions filled by
    :func:`image_token_fill`): the next-token logits and greedy tokens against llama.cpp's."""
    import numpy as np
    import torch

    ids, run = [], []
    for t in got["prompt_ids"] + [None]:
        if t == -1:
            run.append(t)
            continue
        if run:
            ids += image_token_fill(model, tokenizer, len(run), inputs)
            run = []
        if t is not None:
            ids.append(t)
    input_ids = torch.tensor([ids])
    kw = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    kw.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if model.config.model_type == "gemma3":  # image tokens attend to each other both ways (mtmd: non-causal)
        kw["token_type_ids"] = (input_ids == model.config.image_token_id).long()
    with torch.no_grad():
        ref = model(**kw).logits[0, -1].float().numpy()
        gen = model.generate(**kw, max_new_tokens=len(got["tokens"]), do_sample=False)
    theirs = got["logits"]
    out = {"logits_on": "llama.cpp's token ids", "prompt_tokens": len(ids),
           "max_logit_diff": float(np.abs(ref - theirs).max()), "logit_range": float(ref.max() - ref.min()),
           "top1_agree": bool(ref.argmax() == theirs.argmax()), "greedy_tokens_ours": gen[0, len(ids):].tolist()}
    out["greedy_tokens_equal"] = out["greedy_tokens_ours"] == got["tokens"]
    return out


def cls_last_features(model, pixel_values) -> "Any":
    """Our LLaVA (CLIP) model run the way llama.cpp's llava graph orders the sequence (CLS appended
    after the patches, positions 0..n, rows 1..n kept; ggml-org/llama.cpp#25814)."""
    import torch

    vt = model.model.vision_tower
    layers = model.config.vision_feature_layer
    n_blocks = layers + len(vt.encoder.layers) + 1 if layers < 0 else layers
    with torch.no_grad():
        x = vt.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([x, vt.embeddings.class_embedding[None, None].expand(x.shape[0], 1, -1)], 1)
        x = vt.pre_layrnorm(x + vt.embeddings.position_embedding.weight[None])
        for layer in vt.encoder.layers[:n_blocks]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        out = model.model.multi_modal_projector(x[:, 1:])
    return out.reshape(-1, out.shape[-1]).numpy()


def compare_logits(model, proc, prompt: str, placeholder: str, image, got: Dict[str, Any]) -> Dict[str, Any]:
    """Our model on the same prompt (``<image>`` -> the processor's placeholder; mtmd adds Qwen's
    vision_start/end itself): are the token ids the same, how far are the next-token logits, and
    does greedy decoding give the same tokens."""
    import numpy as np
    import torch

    enc = proc(text=prompt.replace("<image>", placeholder), images=[image], return_tensors="pt")
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    ids = [-1 if t == image_id else int(t) for t in enc["input_ids"][0].tolist()]
    out: Dict[str, Any] = {"prompt_ids_equal": ids == got["prompt_ids"], "prompt_tokens": len(ids)}
    if not out["prompt_ids_equal"]:
        out["prompt_ids_ours"], out["prompt_ids_llamacpp"] = ids, got["prompt_ids"]
        return out
    with torch.no_grad():
        ref = model(**enc).logits[0, -1].float().numpy()
        gen = model.generate(**enc, max_new_tokens=len(got["tokens"]), do_sample=False)
    theirs = got["logits"]
    out.update(max_logit_diff=float(np.abs(ref - theirs).max()), logit_range=float(ref.max() - ref.min()),
               top1_agree=bool(ref.argmax() == theirs.argmax()),
               greedy_tokens_ours=gen[0, enc["input_ids"].shape[1]:].tolist())
    out["greedy_tokens_equal"] = out["greedy_tokens_ours"] == got["tokens"]
    return out


def build(name: str):
    """``(model, tokenizer, processor, image, prompt, image placeholder)`` for a tiny VLM or the SmolLM2 demo LLaVA."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_vlms import FAMILIES, make_image

    if name == "demo":
        from demo.assets import fetch_smollm2
        from demo.model import build_llava_with_lm

        model, tok, proc = build_llava_with_lm(fetch_smollm2(ROOT / ".cache" / "assets"))
        model.config.name_or_path = "smollm2-llava-demo"
        prompt = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
        return model, tok, proc, make_image(IMAGE_SIZES[name]), prompt, "<image>"
    if name in GGUF_VARIANTS:
        from tiny_vlms_gguf import GGUF_FAMILIES

        vlm = GGUF_FAMILIES[name]()
        return (vlm.model, vlm.tokenizer, vlm.processor, make_image(IMAGE_SIZES[name]),
                "<|user|>\n<image>What is shown?<|assistant|>\n", None)
    from tiny_vlms_gguf import GGUF_FAMILIES

    # a seed family's GGUF variant where it has one that changes only its config (Qwen2.5-VL: the 112-pixel
    # window llama.cpp runs; the seed zoo's 28 is refused for GGUF), on the same path as the seed families
    vlm = GGUF_FAMILIES.get(name, FAMILIES[name])()
    proc = vlm.processor
    if name.startswith("qwen"):  # processor sized for the bench image (llama.cpp's qwen2vl needs >= 8 tokens)
        side = IMAGE_SIZES[name][0]
        proc.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    if name in ("idefics3", "smolvlm"):  # one 64-px tile (no splitting), so both sides see the same pixels
        proc.image_processor.size = {"longest_edge": IMAGE_SIZES[name][0]}
        proc.image_processor.do_image_splitting = False
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if name.startswith("qwen") else "<image>"
    return (vlm.model, vlm.tokenizer, proc, make_image(IMAGE_SIZES[name]),
            "<|user|>\n<image>What is shown?<|assistant|>\n", placeholder)


def bench_one(name: str, qtype: str, python: str, work: Path) -> Dict[str, Any]:
    import numpy as np
    import torch

    from auto_round.mllm.autoround_mllm import AutoRoundMLLM

    model, tok, proc, image, prompt, placeholder = build(name)
    t0 = time.perf_counter()
    ar = AutoRoundMLLM(model, tok, proc, bits=8 if qtype == "q8_0" else 4, sym=True, group_size=32, iters=0,
                       nsamples=2, seqlen=32, dataset="auto_round:offline_corpus")
    folder = work / f"{name}-{qtype}"
    ar.quantize_and_save(folder, format=f"gguf:{qtype}", inplace=False, overwrite=True)
    export_s = time.perf_counter() - t0
    text_path = next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj-"))
    mm_path = next(folder.glob("mmproj-*.gguf"))
    got = run_llamacpp(python, text_path, mm_path, image, prompt, work / f"{name}-run")
    rec: Dict[str, Any] = {"model": name, "type": qtype, "text_file": text_path.name, "mmproj_file": mm_path.name,
                           "text_mib": round(text_path.stat().st_size / 2**20, 2),
                           "mmproj_mib": round(mm_path.stat().st_size / 2**20, 3), "export_s": round(export_s, 2)}
    if "error" in got:
        rec["error"] = got["error"]
        return rec
    if "eval_error" in got:
        rec["eval_error"] = got["eval_error"]
    inputs = proc.image_processor(images=[image], return_tensors="pt")
    if name in GGUF_VARIANTS:
        return _bench_variant(rec, ar, tok, inputs, got)
    ours = our_image_features(ar.model, inputs)
    as_files = as_in_files(ar.model, ar.quantized_layers)
    ours16 = our_image_features(as_files, inputs)
    theirs = got["embd"][-1]  # the last (for idefics3: the overview) image llama.cpp encoded
    rec.update(n_image_tokens=int(theirs.shape[0]), llamacpp_images=int(got["embd"].shape[0]),
               ours_tokens=int(ours.shape[0]), max_abs_ours=float(np.abs(ours).max()),
               llamacpp_tokens=got.get("tokens"), llamacpp_text=got.get("text", got.get("eval_error")),
               encode_s=round(got["encode_s"], 4))
    if theirs.shape == ours.shape:
        rec["max_diff_vs_ours"] = float(np.abs(theirs - ours).max())
        rec["max_diff_vs_ours_fp16"] = float(np.abs(theirs - ours16).max())
        cos = (theirs * ours).sum(-1) / (np.linalg.norm(theirs, axis=-1) * np.linalg.norm(ours, axis=-1))
        rec["min_token_cosine"] = float(cos.min())
    if "logits" in got:
        rec.update(compare_logits(as_files, proc, prompt, placeholder, image, got))
    if getattr(ar.model.config, "model_type", "") == "llava":
        emu = cls_last_features(as_files, inputs["pixel_values"].to(torch.float32))
        rec["max_diff_vs_cls_last_emulation"] = float(np.abs(theirs - emu).max())
    if getattr(ar.model.config, "model_type", "") == "qwen2_5_vl":
        rec["window_size"] = int(ar.model.config.vision_config.window_size)
    return rec


def _bench_variant(rec: Dict[str, Any], ar, tok, inputs, got: Dict[str, Any]) -> Dict[str, Any]:
    """Gemma-3 / LLaVA-NeXT / Mistral-3: llama.cpp's image embeddings against ours (model in the files'
    precision), per image llama.cpp encoded, then the logits on llama.cpp's token ids."""
    import numpy as np

    model = as_in_files(ar.model, ar.quantized_layers)
    kind = model.config.model_type
    emu = None
    if kind == "llava_next":  # mtmd's order: the tiles row by row, then the overview (transformers': overview first)
        ours = llava_next_tile_features(model, inputs)  # [1 + tiles, n, d]
        ours = np.concatenate([ours[1:], ours[:1]])
        if model.config.vision_config.model_type == "clip_vision_model":  # llama.cpp's CLS-last defect (#25814)
            pix = inputs["pixel_values"][0]
            emu = np.stack([cls_last_features(model, pix[i:i + 1]) for i in [*range(1, len(pix)), 0]])
    elif kind == "mistral3":
        ours = pixtral_features_with_breaks(model, inputs, tok)[None]
    else:
        ours = our_image_features(model, inputs)[None]
    theirs = got["embd"]
    rec.update(llamacpp_images=int(theirs.shape[0]), n_image_tokens=int(theirs.shape[0] * theirs.shape[1]),
               ours_images=int(ours.shape[0]), ours_tokens=int(ours.shape[0] * ours.shape[1]),
               max_abs_ours=float(np.abs(ours).max()), llamacpp_tokens=got.get("tokens"),
               llamacpp_text=got.get("text", got.get("eval_error")), encode_s=round(got["encode_s"], 4))
    if theirs.shape != ours.shape:
        rec["shape_mismatch"] = [list(theirs.shape), list(ours.shape)]
        return rec
    diff = np.abs(theirs - ours).reshape(theirs.shape[0], -1).max(-1)
    rec["max_diff_vs_ours_fp16"] = float(diff.max())
    if kind == "llava_next":
        rec["max_diff_tiles"], rec["max_diff_overview"] = float(diff[:-1].max()), float(diff[-1])
    if emu is not None:
        rec["max_diff_vs_cls_last_emulation"] = float(np.abs(theirs - emu).max())
    a, b = theirs.reshape(-1, theirs.shape[-1]), ours.reshape(-1, ours.shape[-1])
    rec["min_token_cosine"] = float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
    if "logits" in got and kind != "llava_next":
        rec.update(compare_logits_on_ids(model, tok, inputs, got))
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--llamacpp-worker":
        llamacpp_worker(*sys.argv[2:6])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=[*TINY, "demo"],
                   help=f"{list(TINY)}, 'llava_next_siglip' and/or 'demo'")
    p.add_argument("--type", default="q4_0", help="gguf type of the language model (q4_0, q8_0, q4_k_m, ...)")
    p.add_argument("--llamacpp-python", type=Path, default=None)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    python = llamacpp_python(args.llamacpp_python)
    if python is None:
        print("no Python with llama_cpp: python3 -m venv .venv-llamacpp && "
              ".venv-llamacpp/bin/pip install llama-cpp-python==0.3.36 numpy", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    rows = [bench_one(m, args.type, python, WORK) for m in args.models]
    cols = ("model", "type", "n_image_tokens", "max_abs_ours", "max_diff_vs_ours", "max_diff_vs_ours_fp16",
            "max_diff_vs_cls_last_emulation", "min_token_cosine", "max_logit_diff", "top1_agree", "mmproj_mib",
            "llamacpp_text")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, r.get("error", "-"))[:60] if
                 isinstance(r.get(c, r.get("error")), str) else r.get(c, "-")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    version = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # rows of models not run this time are kept (same llama-cpp-python only): one file for every family
    old = json.loads(args.json.read_text()) if args.json.exists() else {}
    kept = [r for r in old.get("results", []) if old.get("llama_cpp_python") == version
            and (r.get("model"), r.get("type")) not in {(n["model"], n["type"]) for n in rows}]
    args.json.write_text(json.dumps({"llama_cpp_python": version, "results": kept + rows}, indent=2, default=str)
                         + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
