"""GGUF K-quant file types (``q4_k_m``, ...) as data: which ggml type each tensor gets, and the fallbacks.

llama.cpp's ``llama_model_quantize`` gives a file type a base type and raises some tensors to a
higher one (``llama_tensor_get_type_impl`` in ``src/llama-quant.cpp``); a row length its type cannot
store (not a multiple of 256) falls back (``tensor_type_fallback``). The same rules are written
here as :class:`Rule` records, decided per layer in the plan before tuning, so the tuned scheme of
every layer is the type it is stored as. With ``i`` the block index and ``n`` the block count:

- ``more_bits``: llama.cpp's ``use_more_bits``: ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``;
- ``first_8th`` / ``first_16th``: ``i < n/8`` / ``i < n/16`` (integer division);
- ``first_2`` / ``first_4``: ``i < 2`` / ``i < 4`` (llama.cpp counts attn_v tensors: one per block);
- ``gqa4``: ``n_head / n_head_kv >= 4``; ``always``.

For the model-size rule (a 70B Llama/Qwen2, 80 blocks with grouped KV: attn_v Q3_K/Q4_K -> Q5_K)
and the output tensor (Q6_K, Q8_0 when its rows are not whole super-blocks), see :func:`tensor_type`.
MoE (n_expert) and Falcon rules do not apply to the families this exporter writes. The embeddings
stay F16 (never quantized here; llama.cpp would quantize ``token_embd`` to the base type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from auto_round.quant.kquant import SUPER_BLOCK

# tensor_type_fallback: K type -> a 32-block type, for rows that are not whole super-blocks.
FALLBACK: Dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
LEGACY_BLOCK = 32


@dataclass(frozen=True)
class Rule:
    """``tensor`` (llama.cpp's category: attn_v, ffn_down, attn_output) gets ``type`` when ``when``."""

    tensor: str
    type: str
    when: str = "always"


@dataclass(frozen=True)
class KMix:
    """One llama.cpp file type: base type, file-type number (llama.h LLAMA_FTYPE_MOSTLY_*) and rules.

    Rules are tried in order; the first whose tensor and condition match decides (llama.cpp's
    if/else chains)."""

    name: str
    base: str
    file_type: int
    rules: Tuple[Rule, ...] = ()


KMIXES: Dict[str, KMix] = {m.name: m for m in (
    KMix("q2_k_s", "q2_k", 21, (Rule("attn_v", "q4_k", "gqa4"), Rule("ffn_down", "q4_k", "first_8th"))),
    KMix("q3_k_m", "q3_k", 12, (Rule("attn_v", "q5_k", "first_2"), Rule("attn_v", "q4_k"),
                                Rule("attn_output", "q4_k"),
                                Rule("ffn_down", "q5_k", "first_16th"), Rule("ffn_down", "q4_k"))),
    KMix("q4_k_s", "q4_k", 14, (Rule("attn_v", "q5_k", "first_4"), Rule("ffn_down", "q5_k", "first_8th"))),
    KMix("q4_k_m", "q4_k", 15, (Rule("attn_v", "q6_k", "more_bits"), Rule("ffn_down", "q6_k", "more_bits"))),
    KMix("q5_k_s", "q5_k", 16),
    KMix("q5_k_m", "q5_k", 17, (Rule("attn_v", "q6_k", "more_bits"), Rule("ffn_down", "q6_k", "more_bits"))),
    KMix("q6_k", "q6_k", 18),
)}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _holds(when: str, i: int, n: int, n_gqa: int) -> bool:
    conditions = {
        "always": True,
        "more_bits": use_more_bits(i, n),
        "first_8th": i < n // 8,
        "first_16th": i < n // 16,
        "first_2": i < 2,
        "first_4": i < 4,
        "gqa4": n_gqa >= 4,
    }
    if when not in conditions:
        raise ValueError(f"unknown rule condition {when!r}; known: {sorted(conditions)}")
    return conditions[when]


def category(gguf_name: str) -> str:
    """llama.cpp's tensor category of a GGUF tensor name (``tensor_get_category``)."""
    if gguf_name == "output.weight":
        return "output"
    for cat in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in gguf_name:
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in gguf_name:
            return cat
    return "other"


def tensor_type(mix: KMix, gguf_name: str, block: Optional[int], n_blocks: int, n_gqa: int,
                is_70b: bool) -> Tuple[str, str]:
    """``(type, why)``: the ggml type llama.cpp's rules give this tensor before any shape fallback."""
    cat = category(gguf_name)
    if cat == "output":
        return "q6_k", "output tensor: q6_k as llama.cpp"
    i = -1 if block is None else block
    new, why = mix.base, ""
    for rule in mix.rules:
        if rule.tensor == cat and _holds(rule.when, i, n_blocks, n_gqa):
            new, why = rule.type, f"{cat} rule {rule.when}"
            break
    if cat == "attn_v" and is_70b and new in ("q3_k", "q4_k"):
        new, why = "q5_k", "attn_v of a 70B model"
    return new, why


def fallback(type_name: str, row: int) -> Tuple[Optional[str], str]:
    """``(type, why)`` for a row of ``row`` weights: the type itself when rows are whole blocks, else
    llama.cpp's fallback (output: q8_0), else None (F16: kept in full precision)."""
    if not type_name.endswith("_k") or row % SUPER_BLOCK == 0:
        return type_name, ""
    new = FALLBACK[type_name]
    if row % LEGACY_BLOCK:
        return None, f"row length {row} is not a multiple of {LEGACY_BLOCK}: F16"
    return new, f"fallback {type_name} -> {new}: row length {row} is not a multiple of {SUPER_BLOCK}"
