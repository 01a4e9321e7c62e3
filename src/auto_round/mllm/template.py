"""Chat templates per ``model_type``: how a calibration conversation becomes the model's text.

A template is data (registered in code or read from a JSON file). It is used when the model's own
processor has no chat template, and always for its ``default_dataset``. Its ``processor`` is None unless
the template names one: the model's family record (:mod:`auto_round.mllm.families`) says which processor a
family takes, in one place; a template that names one overrides it.
The reference's registration call works as written::

    from auto_round.mllm.template import _register_template
    from auto_round.mllm.processor import PROCESSORS
    _register_template(model_type="my_vlm", default_dataset="NeelNanda/pile-10k", processor=PROCESSORS["hf"])
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

from auto_round.mllm.registry import processor_name

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Template:
    """Formats of one family's conversation text (``{content}`` is replaced by the message)."""

    model_type: str
    user_format: str = "User: {content}\n"
    assistant_format: str = "Assistant: {content}\n"
    system_format: str = "{content}\n"
    default_system: str = ""
    separator: str = ""
    replace_tokens: Tuple[Tuple[str, str], ...] = ()  # e.g. (("<image>", "<|image_pad|>"),)
    default_dataset: str = "NeelNanda/pile-10k"
    processor: Optional[str] = None  # None: the family's processor (families.processor_for)

    def render(self, turns: Sequence[Tuple[str, str]], system: Optional[str] = None, has_image: bool = False) -> str:
        """Conversation text; the first user turn carries ``<image>`` when ``has_image``."""
        parts = []
        sys_text = self.default_system if system is None else system
        if sys_text:
            parts.append(self.system_format.format(content=sys_text))
        image_pending = has_image
        for role, text in turns:
            if role == "user" and image_pending:
                text, image_pending = f"{IMAGE_PLACEHOLDER}\n{text}", False
            fmt = self.user_format if role == "user" else self.assistant_format
            parts.append(fmt.format(content=text))
        out = self.separator.join(parts)
        for old, new in self.replace_tokens:
            out = out.replace(old, new)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "<dict>") -> "Template":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"template {source}: unknown field(s) {unknown}; valid: {sorted(names)}")
        if "model_type" not in data:
            raise ValueError(f"template {source}: missing 'model_type'")
        data = dict(data)
        if "replace_tokens" in data:
            rt = data["replace_tokens"]
            pairs = list(rt.items()) if isinstance(rt, dict) else [tuple(p) for p in rt]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"template {source}: replace_tokens must be pairs [old, new]")
            data["replace_tokens"] = tuple((str(a), str(b)) for a, b in pairs)
        return cls(**data)

    def to_json(self) -> str:
        d = asdict(self)
        d["replace_tokens"] = [list(p) for p in self.replace_tokens]
        return json.dumps(d, indent=2)


TEMPLATES: Dict[str, Template] = {}


def register_template(template: Template, overwrite: bool = False) -> Template:
    """Add ``template`` under its ``model_type``; an existing one is kept unless ``overwrite``."""
    if template.model_type in TEMPLATES and not overwrite:
        raise ValueError(f"a template for model_type {template.model_type!r} is already registered; "
                         "pass overwrite=True to replace it")
    TEMPLATES[template.model_type] = template
    return template


def _register_template(model_type: str, default_dataset: str = "NeelNanda/pile-10k",
                       processor: Union[str, Type[Any], None] = None, **formats: Any) -> Template:
    """Reference-compatible registration (replaces an existing template of that type).

    ``processor`` may be a registered processor class (``PROCESSORS["hf"]``) or its name.
    """
    name = processor_name(processor) if processor is not None else None
    data = {"model_type": model_type, "default_dataset": default_dataset, "processor": name, **formats}
    return register_template(Template.from_dict(data, f"_register_template({model_type!r})"), overwrite=True)


def load_template_file(path: Union[str, Path]) -> Template:
    """Read a template JSON file (fields of :class:`Template`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"template file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"template file {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"template file {str(p)!r} must hold a JSON object")
    return Template.from_dict(data, str(p))


def _load_builtin() -> None:
    folder = resources.files("auto_round.mllm").joinpath("templates")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            t = Template.from_dict(json.loads(entry.read_text(encoding="utf-8")), entry.name)
            TEMPLATES.setdefault(t.model_type, t)


def get_template(model_type: str, template: Union[None, str, Path, Template] = None,
                 family_known: bool = False) -> Template:
    """The template for a run: an explicit object, a JSON path or a registered name, else by model type.

    A model type without a template gets the generic one: announced at INFO when its family record
    (``family_known``) describes the model, with a WARNING when nothing is known about it.
    """
    if isinstance(template, Template):
        return template
    if template is not None:
        t = str(template)
        if t in TEMPLATES:
            return TEMPLATES[t]
        if t.endswith(".json") or Path(t).exists():
            return load_template_file(t)
        raise ValueError(f"template={t!r} is neither a registered template ({sorted(TEMPLATES)}) nor a JSON file")
    if model_type in TEMPLATES:
        return TEMPLATES[model_type]
    if family_known:
        logger.info("no template registered for model_type %r: using the generic one with its family record",
                    model_type)
    else:
        logger.warning("model_type %r has no template and no family record: using the generic template (chat "
                       "format and processor 'hf'); check the plan, or pass template='file.json'", model_type)
    return TEMPLATES["default"]


_load_builtin()
