"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), read from a tokenizers-backed tokenizer.

Two vocabulary kinds, as llama.cpp names them:

- ``"gpt2"``: byte-level BPE (a ``ByteLevel`` pre-tokenizer): tokens in their byte-level spelling
  (``Ġ`` for a space), ``merges`` as ``"a b"`` strings in rank order, and ``tokenizer.ggml.pre``
  naming the split regex llama.cpp applies before BPE. Known pre-tokenizers are recognised by
  structure (:data:`PRE_TOKENIZERS`); any other byte-level one gets ``"gpt-2"`` (the regex
  ``ByteLevel`` itself uses) with a warning, instead of llama.cpp's converter's
  ``NotImplementedError``: the file runs, though llama.cpp may split some text (digit runs,
  whitespace, other scripts) differently from transformers.
- ``"llama"``: SentencePiece, as transformers' fast tokenizers hold it (BPE with byte fallback and
  ``▁`` for spaces, or Unigram): tokens as pieces, ``scores`` (Unigram: the piece log-probabilities;
  BPE: ``-rank`` of the merge that makes the piece, 0 for pieces no merge makes, since llama.cpp
  merges the highest-scoring adjacent pair first), byte tokens ``<0xXX>`` typed BYTE.

Token types (``gguf.TokenType``): NORMAL 1, UNKNOWN 2 (SentencePiece's unk), CONTROL 3 (special
added tokens, and ``<|...|>``-looking ones), USER_DEFINED 4 (other added tokens), UNUSED 5 (ids the
model embeds but the tokenizer lacks, written as ``[PAD<id>]``), BYTE 6.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes exactly as the models' tokenizer.json hold them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizer structure (step signatures, see _signature) -> llama.cpp's tokenizer.ggml.pre.
PRE_TOKENIZERS: Dict[Tuple[Tuple[str, Any], ...], str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's own regex, built into ByteLevel
    (("Digits", True), ("ByteLevel", True)): "smollm",  # single digits, then GPT-2's regex
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",  # Qwen1.5/2/2.5
}
FALLBACK_PRE = "gpt-2"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` holds for one tokenizer."""

    model: str  # "gpt2" or "llama"
    tokens: List[str]
    token_types: List[int]
    pre: Optional[str] = None  # gpt2 only
    merges: List[str] = field(default_factory=list)  # gpt2 only
    scores: Optional[List[float]] = None  # llama only
    special_ids: Dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: Optional[bool] = None  # llama only
    chat_template: Union[None, str, List[Dict[str, str]]] = None
    notes: List[str] = field(default_factory=list)  # announced approximations

    def add_to(self, writer: Any) -> None:
        """Write the metadata with a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, tid in self.special_ids.items():
            adders[kind](tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer: Any) -> Dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export reads the vocabulary from a tokenizers-backed (fast) tokenizer; "
                         f"{type(tokenizer).__name__} has none (load it with AutoTokenizer, use_fast=True)")
    return json.loads(backend.to_str())


def _steps(node: Optional[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def _signature(step: Dict[str, Any]) -> Tuple[str, Any]:
    kind = step.get("type", "?")
    if kind == "ByteLevel":
        return kind, bool(step.get("use_regex", True))
    if kind == "Digits":
        return kind, bool(step.get("individual_digits", False))
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return kind, pattern.get("Regex", pattern.get("String"))
    return kind, None


def _kind(j: Dict[str, Any]) -> str:
    model = j.get("model") or {}
    pre = _steps(j.get("pre_tokenizer"), "pretokenizers")
    pre_types = {s.get("type") for s in pre}
    if model.get("type") == "BPE" and "ByteLevel" in pre_types:
        return "gpt2"
    if model.get("type") == "Unigram" or (model.get("type") == "BPE" and model.get("byte_fallback")):
        return "llama"
    raise ValueError(f"GGUF export writes byte-level BPE ('gpt2') and SentencePiece ('llama') vocabularies; "
                     f"this tokenizer is a {model.get('type')} model with pre-tokenizer steps "
                     f"{sorted(t for t in pre_types if t)} and no byte fallback")


def _pre_name(j: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    sig = tuple(_signature(s) for s in _steps(j.get("pre_tokenizer"), "pretokenizers"))
    if sig in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[sig], None
    shown = [k if v is None or isinstance(v, bool) else f"{k}({str(v)[:60]})" for k, v in sig]
    return FALLBACK_PRE, (f"tokenizer.ggml.pre: no llama.cpp pre-tokenizer is known to match {shown}; wrote "
                          f"{FALLBACK_PRE!r} (GPT-2's split regex), so llama.cpp may split some text (digit runs, "
                          "whitespace, other scripts) differently from transformers. If llama.cpp knows this "
                          "pre-tokenizer by another name, add its signature to "
                          "auto_round.export.gguf.vocab.PRE_TOKENIZERS")


def looks_special(token: str) -> bool:
    """Added tokens some checkpoints forget to mark special (llama.cpp's converter's heuristic)."""
    return ((token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            or token in ("<pad>", "<mask>") or (token.startswith("<unused") and token.endswith(">")))


def _merge_text(pair: Any) -> str:
    if isinstance(pair, str):
        return pair
    # Spaces inside a merge part are written as U+0120+256 offsets, like llama.cpp's SpecialVocab.
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)


def _spm_scores(j: Dict[str, Any], tok_to_id: Dict[str, int], n: int) -> List[float]:
    model = j["model"]
    scores = [0.0] * n
    if model["type"] == "Unigram":
        for i, (_piece, score) in enumerate(model["vocab"]):
            if i < n:
                scores[i] = float(score)
        return scores
    seen = set()
    for rank, pair in enumerate(model.get("merges") or []):
        a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
        tid = tok_to_id.get(a + b)
        if tid is not None and tid < n and tid not in seen:
            seen.add(tid)
            scores[tid] = -float(rank)
    return scores


def _space_prefix(j: Dict[str, Any]) -> bool:
    for step in _steps(j.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return any(s.get("type") == "Prepend" and s.get("prepend") == "▁"
               for s in _steps(j.get("normalizer"), "normalizers"))


def _adds(tokenizer: Any, tid: Optional[int], first: bool) -> bool:
    if tid is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    return len(full) > len(plain) and full[0 if first else -1] == tid


def _chat_template(tokenizer: Any) -> Union[None, str, List[Dict[str, str]]]:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        return [{"name": k, "template": v} for k, v in tpl.items()]
    return tpl if isinstance(tpl, str) else None


def build_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` for a model embedding ``vocab_size`` ids.

    ValueError (with the reason) for tokenizers llama.cpp cannot represent.
    """
    if tokenizer is None:
        raise ValueError("a GGUF file carries the tokenizer and none was given; pass tokenizer=... to AutoRound")
    j = _backend_json(tokenizer)
    kind = _kind(j)
    tok_to_id: Dict[str, int] = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    top = max(tok_to_id.values())
    if top >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {top} but the model embeds only {vocab_size}; llama.cpp "
                         "needs an embedding row for every token")
    id_to_tok = {i: t for t, i in tok_to_id.items()}
    added = {a["id"]: a for a in j.get("added_tokens", [])}
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(vocab_size):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif kind == "llama" and i == unk:
            tokens.append(tok)
            types.append(UNKNOWN)
        elif i in added:
            special = added[i].get("special", False) or looks_special(tok)
            tokens.append(tok if special or kind == "gpt2" else tok.replace("▁", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(BYTE if kind == "llama" and _BYTE_TOKEN.fullmatch(tok) else NORMAL)
    vocab = GGUFVocab(kind, tokens, types, chat_template=_chat_template(tokenizer))
    if kind == "gpt2":
        vocab.pre, note = _pre_name(j)
        vocab.notes += [note] if note else []
        vocab.merges = [_merge_text(m) for m in j["model"].get("merges") or []]
    else:
        vocab.scores = _spm_scores(j, tok_to_id, vocab_size)
        vocab.add_space_prefix = _space_prefix(j)
    for kind_name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind_name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            vocab.special_ids[kind_name] = tid
    vocab.add_bos = _adds(tokenizer, vocab.special_ids.get("bos"), first=True)
    vocab.add_eos = _adds(tokenizer, vocab.special_ids.get("eos"), first=False)
    return vocab
