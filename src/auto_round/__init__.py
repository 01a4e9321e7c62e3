"""auto_round: SignRound weight-only quantization for LLMs and vision-language models.

Public API: :class:`AutoRound`, :class:`AutoRoundMLLM`, :func:`quantize_model_free` (round-to-nearest
shard by shard, without loading the model) and the recipe helpers in :mod:`auto_round.cli`.
Importing this package touches neither CUDA nor optional packages.
"""

from auto_round.version import __version__

__all__ = ["AutoRound", "AutoRoundMLLM", "quantize_model_free", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import auto_round` stays cheap (transformers imports auto_round.inference).
    if name == "AutoRound":
        from auto_round.autoround import AutoRound

        return AutoRound
    if name == "AutoRoundMLLM":
        from auto_round.mllm.autoround_mllm import AutoRoundMLLM

        return AutoRoundMLLM
    if name == "quantize_model_free":
        from auto_round.model_free import quantize_model_free

        return quantize_model_free
    raise AttributeError(f"module 'auto_round' has no attribute {name!r}")
