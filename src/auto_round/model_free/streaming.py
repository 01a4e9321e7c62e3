"""Block-streamed tuning (``low_cpu_mem_usage=True``): full SignRound on a model larger than RAM.

Lifecycle of :func:`quantize_and_save_streamed` (what ``AutoRound.quantize_and_save`` runs then):

1. **refuse** what cannot stream, before any data is built (:func:`check_streamable`): several formats,
   a format without a streaming writer (every packed-integer format of the model-free writer streams:
   ``auto_round`` and its aliases, ``auto_gptq``, ``auto_awq``; not ``gguf``, ``fake``,
   ``llm_compressor``), mixed bits (``avg_bits`` scores the whole model), plain RTN (that is
   :func:`~auto_round.model_free.quantize_model_free`), several block lists.
2. **plan** on the weightless skeleton (:mod:`auto_round.models.streamed`) with the facade's own
   ``resolve_plan``, and **lay out the output** as model-free RTN does (input shard ``i`` -> output shard
   ``i``; each quantized Linear's packed tensors; every other tensor copied, in the dtype the in-memory
   model holds it); the output folder is checked with the exact file names and sizes.
3. inside :func:`~auto_round.export.folder.write_atomically`: every output shard's header is written
   and the file sized (:class:`~auto_round.model_free.shards.ShardWriter`); then the facade's quantize
   runs **the block loop of the in-memory path** (:func:`auto_round.tuning.loop.quantize_model`) with
   :class:`StreamedUnits` as its hooks: the capture loads only the modules the forward reaches before
   the first block (embeddings; freed after) and stands in for the weightless blocks
   (``shapes_only``, :mod:`auto_round.calib.cache`); each unit's blocks are read from the shards, tuned
   by the same per-unit code, their outputs become the next unit's inputs, their packed tensors are
   written at their places, and they go back to the meta device. Layers quantized outside the blocks
   (``quant_lm_head``) are loaded, rounded and written the same way.
4. the tensors kept as they are are copied shard to shard in row chunks; ``config.json``,
   ``quantization_config.json``, the index, the generation config, the tokenizer and the run report.

Peak memory: one unit (its weights in float32 while tuned) plus the calibration cache (the unit's
inputs and targets), whatever the depth. The tensors written are byte-identical to the in-memory
``AutoRound(folder, ...).quantize_and_save(format=...)`` with the same settings and seed
(``tests/test_streaming.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from auto_round.calib.cache import CapturedBatch, capture_block_inputs
from auto_round.device import trim_heap
from auto_round.export.folder import check_output_dir, parse_formats, write_atomically
from auto_round.model_free.checkpoint import INDEX, Checkpoint
from auto_round.model_free.core import (COPY_CHUNK_BYTES, layer_layout, packed_tensors, replace_with_packed,
                                        shard_names, tied_copies, _shards)
from auto_round.model_free.shards import OutSpec, ShardWriter
from auto_round.models.streamed import FIX, StreamedWeights
from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.loop import UnitHooks
from auto_round.tuning.plan import QuantPlan
from auto_round.tuning.resume import clear_resume_dir, default_resume_dir

logger = logging.getLogger(__name__)


def streamable_formats() -> List[str]:
    """The formats a streamed run writes: the packed-integer formats of the model-free shard writer."""
    from auto_round.export import get_format
    from auto_round.export.auto_round_format import AutoRoundExporter
    from auto_round.export.registry import available_formats

    return [f for f in available_formats() if isinstance(get_format(f), AutoRoundExporter)]


def check_streamable(ar: Any, formats: Sequence[str]) -> Any:
    """Refuse a streamed run that cannot be done, naming the value and the fix; returns the exporter."""
    from auto_round.export import get_format

    s = ar.settings
    if len(formats) != 1:
        raise ValueError(f"format={','.join(formats)!r}: low_cpu_mem_usage=True writes one checkpoint as it tunes; "
                         f"export one format per run, {FIX} (then several formats are written from one run)")
    if formats[0] not in streamable_formats():
        raise ValueError(f"format {formats[0]!r} has no streaming writer; low_cpu_mem_usage=True writes "
                         f"{streamable_formats()}: choose one of them, {FIX}")
    if s.avg_bits is not None:
        raise ValueError(f"avg_bits={s.avg_bits!r}: mixed bits score every layer of the whole model on the calibration "
                         f"data before tuning; with low_cpu_mem_usage=True pass per-layer schemes with layer_config, "
                         f"{FIX}")
    if s.iters == 0 and s.disable_opt_rtn:
        raise ValueError("iters=0 with disable_opt_rtn=True is plain round-to-nearest, which needs no calibration and "
                         "no model: quantize it shard by shard with auto_round.quantize_model_free(model_dir, "
                         "output_dir, ...) (CLI --model_free), or drop disable_opt_rtn for optimized RTN, which streams")
    return get_format(formats[0])


def _meta_record(q: QuantizedWeight) -> QuantizedWeight:
    """``q`` with every tensor replaced by a meta tensor of its shape (a written layer's record, kept for
    the run's summary and checks at no memory cost)."""
    changes = {f.name: getattr(q, f.name).to("meta") for f in dataclasses.fields(q)
               if isinstance(getattr(q, f.name), torch.Tensor)}
    if isinstance(getattr(q, "kquant", None), dict):
        changes["kquant"] = {k: v.to("meta") for k, v in q.kquant.items()}
    return dataclasses.replace(q, **changes)


class StreamedWriter:
    """The output checkpoint of a streamed run, laid out before any weight is read (see the module
    docstring, phase 2) and written tensor by tensor as the run produces them."""

    def __init__(self, model: nn.Module, plan: QuantPlan, ckpt: Checkpoint, exporter: Any) -> None:
        self.ckpt, self.exporter = ckpt, exporter
        self.layers, self.style, self.records, self.modules = layer_layout(model, plan, ckpt, exporter)
        state = {k: v.dtype for k, v in model.state_dict().items()}
        model_name = {stored: name for name, stored in ckpt.stored_as.items()}
        dropped = [t for t in ckpt.where if model_name.get(t, t) not in state]
        if dropped:  # as save_pretrained, which writes the model's tensors only
            logger.info("not written (not tensors of %s): %s", type(model).__name__, ", ".join(dropped[:6]))
        self.shards = _shards(ckpt, self.layers, [*tied_copies(model, ckpt), *dropped])
        for sh in self.shards:  # copies are written in the dtype the in-memory model holds them in
            sh.specs = [OutSpec(s.name, state[model_name.get(s.name, s.name)], s.shape)
                        if sh.source[s.name][0] == "copy" else s for s in sh.specs]
        self.names = shard_names(len(self.shards))
        self._writers: List[ShardWriter] = []
        self._where: Dict[str, ShardWriter] = {}
        self.written_bytes = 0

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for sh in self.shards for s in sh.specs)

    def will_write(self, extra: Iterable[str]) -> List[str]:
        from auto_round.export.auto_round_format import CONFIG_FILE

        return [*self.names, *([INDEX] if len(self.names) > 1 else []), "config.json", CONFIG_FILE, *extra]

    def open(self, folder: Path) -> None:
        """Write every shard's header into ``folder``, each file sized for its tensors."""
        self._writers = [ShardWriter(folder / n, sh.specs, {"format": "pt"}) for n, sh in zip(self.names, self.shards)]
        self._where = {s.name: w for w in self._writers for s in w.specs}

    def write_layers(self, records: Mapping[str, QuantizedWeight]) -> None:
        """Pack ``records`` as the exporter does and write their tensors at their places."""
        for name, qw in records.items():
            for t, v in packed_tensors(self.layers[name], qw, self.style, self.exporter).items():
                self._where[t].write(t, v)

    def copy_rest(self) -> None:
        """Copy every tensor kept as it is from the checkpoint, in row chunks, cast to its planned dtype."""
        for sh, w in zip(self.shards, self._writers):
            for s in w.specs:
                kind, what = sh.source[s.name]
                if kind == "copy":
                    reader = self.ckpt.readers[self.ckpt.where[what]]
                    w.write(s.name, (c.to(s.dtype) for c in reader.iter_rows(what, COPY_CHUNK_BYTES)))

    def finish(self, folder: Path, model: nn.Module, qconfig: Dict[str, Any]) -> None:
        """Close the shards (every tensor written), then the index, config.json and quantization_config.json
        as the in-memory export writes them, and the generation config."""
        from auto_round.export.auto_round_format import CONFIG_FILE

        self.written_bytes = sum(w.close() for w in self._writers)
        if len(self.names) > 1:
            weight_map = {s.name: n for n, sh in zip(self.names, self.shards) for s in sh.specs}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        replace_with_packed(model, self.modules)
        config = self.exporter.final_config(dict(qconfig), self.style, model, self.records)
        model.config.quantization_config = config
        model.config.save_pretrained(str(folder))
        with open(folder / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        source = self.ckpt.folder / "generation_config.json"
        if source.is_file():
            shutil.copy2(source, folder / source.name)
        elif getattr(model, "can_generate", lambda: False)():
            model.generation_config.save_pretrained(str(folder))


class StreamedUnits(UnitHooks):
    """The block loop's hooks for a streamed model: capture with the blocks weightless, each unit loaded
    from the shards before its tuning, written and freed after it."""

    def __init__(self, weights: StreamedWeights, writer: StreamedWriter, plan: QuantPlan) -> None:
        self.weights, self.writer, self.plan = weights, writer, plan
        self.block_paths = [path for path, _ in plan.block_lists]
        self.planned = {lp.name for lp in plan.quantized}

    def capture(self, model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Mapping[str, Any]],
                cache_device: torch.device, put: Optional[Callable[[Any], Any]] = None) -> List[CapturedBatch]:
        with self.weights.outside(self.block_paths):
            try:
                return capture_block_inputs(model, blocks, batches, cache_device, shapes_only=True, put=put)
            except (RuntimeError, NotImplementedError) as e:
                if "meta" not in str(e):
                    raise
                raise ValueError(f"the calibration forward of {type(model).__name__} used a weight that is not loaded "
                                 f"before its first block ({str(e).splitlines()[0][:200]}): its modules before the "
                                 f"blocks read weights other than by being called, so they cannot be loaded on "
                                 f"demand; {FIX}") from e

    def load(self, model: nn.Module, names: Sequence[str]) -> None:
        for n in names:
            self.weights.load(n)
        bad = [lp for n in names for lp in [*self.plan.in_block(n), *[p for p in self.plan.quantized if p.name == n]]
               if not bool(torch.isfinite(model.get_submodule(lp.name).weight).all())]
        if bad:
            raise ValueError(f"the weights of {len(bad)} layer(s) hold NaN or Inf: {', '.join(lp.name for lp in bad[:8])};"
                             " the model is damaged (check the checkpoint), or keep them FP with fp_layers")

    def release(self, model: nn.Module, names: Sequence[str],
                records: Dict[str, QuantizedWeight]) -> Dict[str, QuantizedWeight]:
        self.writer.write_layers(records)
        for n in names:
            self.weights.free(n)
        kept = {k: _meta_record(q) for k, q in records.items()}
        trim_heap()  # the freed block's pages back to the system: a flat peak with depth, not glibc's creep
        return kept

    def fingerprint(self, model: nn.Module) -> str:
        return self.weights.fingerprint()


def quantize_and_save_streamed(ar: Any, output_dir: Union[str, Path], format: Union[str, Sequence[str]],
                               overwrite: Optional[bool]) -> List[Path]:
    """What ``ar.quantize_and_save`` runs for ``low_cpu_mem_usage=True`` (see the module docstring);
    returns the output folder in a list, as the in-memory method does."""
    from auto_round.report import write_report

    formats = parse_formats(format)
    exporter = check_streamable(ar, formats)
    plan = ar.resolve_plan(formats, read_weights=False)
    if len(plan.block_lists) != 1:
        raise ValueError(f"to_quant_block_names={','.join(p for p, _ in plan.block_lists)!r}: low_cpu_mem_usage=True "
                         "captures one block list from the model's forward; quantize one block list per run, "
                         f"{FIX}")
    weights: StreamedWeights = ar.streamed_weights
    writer = StreamedWriter(ar.model, plan, weights.ckpt, exporter)
    extra = ["tokenizer.json", "tokenizer_config.json"] if ar.tokenizer is not None else []
    check_output_dir(output_dir, ar.source, overwrite, will_write=writer.will_write(extra),
                     estimated_bytes=writer.total_bytes)
    resume = ar.settings.resume_dir or str(default_resume_dir(output_dir))
    hooks = StreamedUnits(weights, writer, plan)

    def write(tmp: Path) -> None:
        writer.open(tmp)
        ar.run_quantize(formats, resume, hooks)
        t0 = time.perf_counter()
        writer.copy_rest()
        writer.finish(tmp, ar.model, ar.quantization_config())
        ar.save_extra_files(tmp)
        ar.phase_seconds[f"export:{formats[0]}"] = time.perf_counter() - t0
        write_report(tmp, ar.run_report(formats[0]))

    target = write_atomically(output_dir, ar.source, overwrite, write)
    ar.mark_saved()
    clear_resume_dir(resume)
    logger.info("streamed %d blocks: read %.2f GB of weights, wrote %.2f GB to %s", len(plan.block_lists[0][1]),
                weights.read_bytes / 1e9, writer.written_bytes / 1e9, target)
    return [target]
