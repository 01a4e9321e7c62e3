"""A model folder's safetensors checkpoint as model-free mode reads it: which files (one file or an
index), each tensor's file and place (headers only, no tensor data), and the names transformers gives
its tensors when it loads them into the model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch.nn as nn

from auto_round.model_free.shards import ShardReader, TensorInfo

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class Checkpoint:
    """A local model folder's safetensors shards: ``readers`` in file order, ``where``: tensor -> file."""

    folder: Path
    readers: Dict[str, ShardReader]
    where: Dict[str, str]
    stored_as: Dict[str, str] = field(default_factory=dict)  # model tensor name -> checkpoint name (renamed)

    def stored_name(self, model_name: str) -> Optional[str]:
        """The checkpoint's name of the model's tensor ``model_name`` (None: not in the checkpoint)."""
        return self.stored_as.get(model_name, model_name if model_name in self.where else None)

    def info(self, name: str) -> TensorInfo:
        return self.readers[self.where[name]].tensors[name]

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _shard_files(folder: Path) -> List[str]:
    """The weight files transformers would read: ``model.safetensors``, else the index's files, else the
    only ``.safetensors`` file; errors name what the folder holds instead."""
    if (folder / SINGLE).is_file():
        return [SINGLE]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(folder / INDEX)!r} is not a valid safetensors index ({e}); re-export the "
                             "model with save_pretrained") from e
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder / INDEX)!r} names shard(s) that are missing: {missing[:4]}; the "
                                    "download is incomplete: fetch those files")
        return files
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise ValueError(f"{str(folder)!r} holds several .safetensors files ({', '.join(found[:4])}) but no {INDEX} "
                         "saying which form the model; add the index (save_pretrained writes it)")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{str(folder)!r} holds pickled weights only ({', '.join(pickled[:3])}); model-free mode "
                         "reads .safetensors only: convert the model (load it and save_pretrained it), or use "
                         "the in-memory path AutoRound(model_dir, iters=0, disable_opt_rtn=True, allow_pickle=True)")
    raise FileNotFoundError(f"{str(folder)!r} holds no model weights (no .safetensors file); pass the folder the "
                            "model was downloaded or saved to")


def find_checkpoint(model_dir: Union[str, Path]) -> Checkpoint:
    """Read the headers of ``model_dir``'s safetensors shards (no tensor data is read)."""
    folder = Path(model_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model_dir {str(folder)!r} does not exist; model-free mode reads a local model folder "
                                "(config.json and .safetensors shards): download the model first, e.g. "
                                "`huggingface-cli download <id> --local-dir <folder>`")
    if not folder.is_dir():
        raise NotADirectoryError(f"model_dir {str(folder)!r} is a file; pass the model's folder (the one holding "
                                 "config.json)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; model-free mode needs the model's config to "
                                "decide which layers to quantize")
    readers: Dict[str, ShardReader] = {}
    where: Dict[str, str] = {}
    for name in _shard_files(folder):
        readers[name] = reader = ShardReader(folder / name)
        for t in reader.tensors:
            if t in where:
                raise ValueError(f"tensor {t!r} is stored twice, in {where[t]!r} and {name!r}; the checkpoint is "
                                 "inconsistent: re-export it")
            where[t] = name
    return Checkpoint(folder, readers, where)


def map_names(skeleton: nn.Module, ckpt: Checkpoint) -> None:
    """Fill ``ckpt.stored_as`` with the renamings transformers applies when it loads this checkpoint into
    this model (e.g. a LLaVA saved as ``language_model.model.layers.*`` is loaded into
    ``model.language_model.layers.*``), as ``convert_and_load_state_dict_in_model`` renames keys. Only
    one-to-one renamings are used: a tensor that transformers fuses or splits at load (a
    ``WeightConverter``) keeps no model name, so a Linear fed by one is reported missing, not skipped."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError as e:  # announced: names must then match the model's module names as they are
        logger.warning("this transformers has no checkpoint key renaming API (%s): checkpoint tensor names are taken "
                       "as the model's", e)
        return
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    for key in sorted(ckpt.where, key=dot_natural_key):  # the order transformers renames in (some renamings hold state)
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:
            new, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if pattern is None and new != key and new in meta:
            if new in ckpt.stored_as or new in ckpt.where:
                other = ckpt.stored_as.get(new, new)
                raise ValueError(f"checkpoint tensors {other!r} and {key!r} both load into the model's {new!r}; the "
                                 "checkpoint is inconsistent: re-export it")
            ckpt.stored_as[new] = key
    if ckpt.stored_as:
        logger.info("%d checkpoint tensor names differ from the model's (renamed as transformers loads them), e.g. "
                    "%s -> %s", len(ckpt.stored_as), *next((v, k) for k, v in ckpt.stored_as.items()))
