"""Resume: tuned units are checkpointed as the run goes, so an interrupted run continues where it stopped.

After each tuned unit the folder receives ``unit-<index>.pt`` (the unit's integer records, its losses,
and the state of the batch-order generator after it), written atomically (temporary file, then
rename), so a kill at any moment leaves only complete units. ``state.json`` holds the run's
fingerprint: the settings that change the result, the plan (every layer's scheme), the model (parameter
names, shapes, dtypes and a hash of the leading bytes of each) and the calibration data (a hash of
every batch). A rerun with the same fingerprint skips the saved units: it writes their recorded weights
back and recomputes their outputs with the same forward passes, so the result is bit-identical to an
uninterrupted run; a different fingerprint is refused, naming what differs.

Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from auto_round.config import Settings
from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.plan import QuantPlan

logger = logging.getLogger(__name__)

STATE = "state.json"
# Settings that do not change the result (where caches live, which device, where to resume from).
_NOT_IN_FINGERPRINT = ("device", "offload_dir", "low_gpu_mem_usage", "resume_dir", "low_cpu_mem_usage")
_HEAD_BYTES = 1 << 16


def _tensor_digest(h: "hashlib._Hash", t: torch.Tensor, limit: Optional[int] = None) -> None:
    flat = t.detach().reshape(-1).cpu().contiguous()
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    if limit is not None:
        raw = raw[:limit]
    h.update(raw.numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Names, shapes and dtypes of every parameter, and the leading 64 KiB of each one's bytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if not p.is_meta:
            _tensor_digest(h, p, _HEAD_BYTES)
    return h.hexdigest()


def data_fingerprint(batches: Iterable[Mapping[str, Any]]) -> str:
    """A hash of every tensor of every calibration batch."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(f"{tuple(value.shape)}:{value.dtype}".encode())
                _tensor_digest(h, value)
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def run_fingerprint(settings: Settings, plan: QuantPlan, model: nn.Module,
                    model_digest: Optional[str] = None) -> Dict[str, Any]:
    """What must match for a saved unit to be reused (the data part is added once it is built);
    ``model_digest``: the model's :func:`model_fingerprint` when computed elsewhere (a streamed model,
    whose weights are in its shards)."""
    s = {k: v for k, v in asdict(settings).items() if k not in _NOT_IN_FINGERPRINT}
    return {
        "settings": json.loads(json.dumps(s, default=str, sort_keys=True)),
        "plan": [[lp.name, None if lp.params is None else [lp.params.bits, lp.params.group_size, lp.params.scheme]]
                 for lp in plan.layers],
        "model": model_digest if model_digest is not None else model_fingerprint(model),
    }


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "settings":
            a, b = saved.get(key, {}), now.get(key, {})
            out += [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif saved.get(key) != now.get(key):
            out.append(f"{key} differs" if key != "plan" else "the plan (layers or their schemes) differs")
    return out


class ResumeStore:
    """The resume folder of one run (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: Dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self.folder / STATE
        if state.is_file():
            saved = json.loads(state.read_text(encoding="utf-8"))
            diff = _differences(saved, fingerprint)
            if diff:
                raise ValueError(f"resume folder {str(self.folder)!r} holds a run with other inputs: "
                                 + "; ".join(diff) + ". Rerun with the same model, data and settings to resume, "
                                 "or remove the folder (or choose another resume_dir) to start afresh")
            done = sorted(self.folder.glob("unit-*.pt"))
            if done:
                logger.info("resuming from %s: %d tuned unit(s) found", self.folder, len(done))
        else:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, state)

    def _path(self, index: int) -> Path:
        return self.folder / f"unit-{index:05d}.pt"

    def save_unit(self, index: int, name: str, layers: Dict[str, QuantizedWeight], result: Dict[str, Any],
                  gen_state: torch.Tensor) -> None:
        records = {n: {"codes": q.codes, "scale": q.scale, "zero": q.zero, "bits": q.bits, "group_size": q.group_size,
                       "sym": q.sym, "bias": q.bias, "data_type": q.data_type, "kquant": q.kquant} for n, q in layers.items()}
        tmp = self._path(index).with_suffix(".tmp")
        torch.save({"name": name, "layers": records, "result": result, "gen_state": gen_state}, tmp)
        os.replace(tmp, self._path(index))

    def load_unit(self, index: int, name: str) -> Optional[Tuple[Dict[str, QuantizedWeight], Dict[str, Any], torch.Tensor]]:
        path = self._path(index)
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["name"] != name:
            raise ValueError(f"resume file {str(path)!r} holds unit {data['name']!r}, not {name!r}: remove the folder")
        layers = {n: QuantizedWeight(**r) for n, r in data["layers"].items()}
        return layers, data["result"], data["gen_state"]

    @staticmethod
    def remove(folder: Path) -> None:
        """Remove a store's own files (and the folder when nothing else is left in it)."""
        for p in [*folder.glob("unit-*.pt"), *folder.glob("unit-*.tmp"), folder / STATE, folder / "state.tmp"]:
            p.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass


def default_resume_dir(output_dir: Union[str, Path]) -> Path:
    """Where :meth:`AutoRound.quantize_and_save` checkpoints tuned blocks: ``.<name>.resume`` beside the output."""
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.resume"


def clear_resume_dir(folder: Union[str, Path]) -> None:
    """Remove the resume store at ``folder`` once its checkpoint is complete (nothing when there is none)."""
    if Path(folder).is_dir():
        ResumeStore.remove(Path(folder))
