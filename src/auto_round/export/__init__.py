"""Export formats: one module per format, found through the registry."""

from auto_round.export.registry import Exporter, available_formats, get_format, register_format

__all__ = ["Exporter", "available_formats", "get_format", "register_format"]
