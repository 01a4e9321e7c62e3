"""A small byte-level BPE tokenizer built fully in code and offline, for tests.

``make_tokenizer()`` trains a byte-level BPE with the ``tokenizers`` library on the first part of
the offline corpus shipped in ``auto_round/calib/data`` (well under two seconds), wraps it in a
``transformers`` fast tokenizer with bos/eos/unk/pad tokens and a simple Jinja chat template, and
caches it per process. The tokenizer adds ``<|bos|>`` at the start of every encoded text when
``add_special_tokens=True`` (like Llama tokenizers), so code paths that handle a BOS are exercised.

The cached object is shared by all tests of a process: do not mutate it (``copy.deepcopy`` it
first if a test needs to change e.g. ``padding_side``).
"""

from __future__ import annotations

import functools
from importlib import resources

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, UNK, PAD = "<|bos|>", "<|eos|>", "<|unk|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD)
# 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Characters of the offline corpus used for training: enough for a few hundred merges, fast.
TRAIN_CHARS = 120_000

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _training_text() -> list[str]:
    """Return the paragraphs of the first ``TRAIN_CHARS`` characters of the shipped offline corpus."""
    corpus = resources.files("auto_round.calib").joinpath("data/offline_corpus.txt")
    text = corpus.read_text(encoding="utf-8")[:TRAIN_CHARS]
    return [para for para in text.split("\n\n") if para.strip()]


@functools.lru_cache(maxsize=None)
def make_tokenizer(vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Build (once per process and size) a byte-level BPE fast tokenizer with at most ``vocab_size`` ids.

    Every id is ``< vocab_size``, so a tiny model built with ``vocab_size=vocab_size`` accepts
    all of its outputs. Special tokens: ``<|bos|>`` (prepended on encode), ``<|eos|>``,
    ``<|unk|>``, ``<|pad|>``. ``apply_chat_template`` works with role/content messages.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}"
        )
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) > vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} ids, more than vocab_size={vocab_size}")
    return tokenizer
