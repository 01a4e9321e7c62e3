"""Vision-language models: families, calibration data, templates and processors.

The two processor modules are imported here so that every built-in processor name is registered in
:mod:`auto_round.mllm.registry` whichever module of this package is imported first (the templates
validate the names they are given against it).
"""

from auto_round.mllm import processor, remote_processors  # noqa: F401  (register the built-in processors)
