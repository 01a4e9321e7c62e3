"""``QuantLinear``: the inference module of a packed weight-only quantized linear layer.

It holds a checkpoint's tensors as buffers (so that ``from_pretrained`` loads straight into them
and ``save_pretrained`` writes them back) and runs through one backend of
:mod:`auto_round.inference.backends`, chosen and prepared in :meth:`QuantLinear.post_init`.

The buffers' shapes and packing are those of the checkpoint's ``packing_format``, owned by
:mod:`auto_round.export.layout` (GPTQ-style input-packed words, raw zeros, or AWQ's
output-packed words); ``g_idx`` int32 ``[in_features]`` is added for GPTQ checkpoints: ``i // group_size``,
or, for act-order (``desc_act=True``) checkpoints, any grouping of ``group_size`` channels per group, run
with the input channels permuted so that each group's are side by side. ``scales`` ``[G, out_features]`` are in
the run's ``scale_dtype``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from auto_round.export.layout import PACKING_FORMATS, layout_for, pack, to_canonical
from auto_round.inference.backends import Backend, PackedTensors, select_backend
from auto_round.quant.pack import pack_bits, unpack_bits
from auto_round.quant.qdq import n_groups
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

# packing_format -> value subtracted from the zero point before it is stored.
ZERO_OFFSETS: Dict[str, int] = {name: layout.zero_offset for name, layout in PACKING_FORMATS.items()}

# dtypes the ``scales`` tensor may have on disk (``quantization_config.scale_dtype``).
SCALE_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _reset_after_load(module: "QuantLinear", incompatible_keys: Any) -> None:
    """load_state_dict hook: new buffer values make the prepared backend state stale."""
    module._reset_state()


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear`` replacement: ``y = x @ W^T + b``.

    ``W[o, i] = scales[g, o] * (code[i, o] - z[g, o])`` with ``g = i // group_size``, ``code``
    unpacked from ``qweight`` and ``z`` from ``qzeros`` (plus the format's zero offset).

    ``backend``: ``"auto"`` or a backend name; resolved against the buffers' device in
    :meth:`post_init` (called by the loaders, or lazily by the first ``forward``). ``"auto"``
    keeps the weight packed (``"cpu_int4"`` where it can run, else ``"torch"``);
    ``"torch_cached"`` trades memory for speed: a full weight in the input dtype, built on the
    first forward (see :mod:`auto_round.inference.backends`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool = True,
        bias: bool = False,
        packing_format: str = "auto_round",
        backend: str = "auto",
        with_g_idx: bool = False,
        device: Optional[torch.device] = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if group_size <= 0:
            raise ValueError(f"group_size={group_size} must be resolved to a positive value")
        if scale_dtype not in SCALE_STORAGE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype} cannot be stored; use one of {SCALE_STORAGE_DTYPES}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.packing_format = packing_format
        self.layout = layout_for(packing_format)
        why = self.layout.cannot_store(bits, out_features)
        if why:
            raise ValueError(f"a [{out_features}, {in_features}] layer cannot use packing_format {packing_format!r}: {why}")
        self.backend = backend
        self.backend_name: Optional[str] = None
        self._state: Optional[Dict[str, Any]] = None
        self._perm: Optional[torch.Tensor] = None  # act-order input permutation, set by post_init
        groups = n_groups(in_features, group_size)
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(self.layout.qweight_shape(in_features, out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer(
            "qzeros", torch.zeros(self.layout.qzeros_shape(groups, out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw))
        else:
            self.bias = None
        if with_g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        else:
            self.g_idx = None
        self.register_load_state_dict_post_hook(_reset_after_load)
        self._awaiting: Optional[set] = None  # checkpoint tensors not loaded yet (see expect_checkpoint)

    def expect_checkpoint(self) -> None:
        """Mark this empty layer as waiting for its checkpoint tensors: :meth:`post_init` refuses to run
        while one of them was not loaded (transformers would leave it as uninitialised memory)."""
        self._awaiting = {n for n in ("qweight", "qzeros", "scales", "bias", "g_idx") if getattr(self, n) is not None}

    def __setattr__(self, name: str, value: Any) -> None:
        awaiting = self.__dict__.get("_awaiting")
        # transformers assigns every checkpoint tensor it loaded with the _is_hf_initialized flag, and
        # assigns empty_like placeholders (garbage memory) for missing or misshapen keys without it.
        if awaiting and name in awaiting and getattr(value, "_is_hf_initialized", False):
            awaiting.discard(name)
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if self._awaiting:
            self._awaiting -= {n for n in list(self._awaiting) if prefix + n in state_dict}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, packing_format: str = "auto_round", backend: str = "auto"
    ) -> "QuantLinear":
        """Pack a :class:`QuantizedWeight` (codes ``[out, in]``, scale/zero ``[out, G]``); the scales keep
        the dtype they were tuned in (``scale_dtype``)."""
        layer = cls(
            qw.in_features,
            qw.out_features,
            qw.bits,
            qw.group_size,
            sym=qw.sym,
            bias=qw.bias is not None,
            packing_format=packing_format,
            backend=backend,
            device=qw.codes.device,
            scale_dtype=qw.scale.dtype,
        )
        qweight, qzeros = pack(layer.layout, qw.codes, qw.zero, qw.bits)
        layer.qweight.copy_(qweight)
        layer.qzeros.copy_(qzeros)
        layer.scales.copy_(qw.scale.t())
        if qw.bias is not None:
            layer.bias.copy_(qw.bias.detach().to(torch.float16))
        return layer

    def packed(self) -> PackedTensors:
        """The checkpoint tensors as the input-packed :class:`PackedTensors` the backends run (AWQ
        words are repacked; the other layouts are passed as they are)."""
        qweight, qzeros, offset = to_canonical(self.layout, self.qweight, self.qzeros, self.bits, self.in_features,
                                               self.out_features)
        return PackedTensors(qweight, qzeros, self.scales, self.bits, self.group_size, self.in_features,
                             self.out_features, offset)

    @property
    def weight(self) -> torch.Tensor:
        """Shape/dtype stand-in ``[out, in]`` on the meta device (the real weight is ``qweight``).

        transformers re-runs weight init on modules when any checkpoint key is missing (a tied
        lm_head, say), and some ``_init_weights`` read ``module.q_proj.weight``; the flag makes its
        guarded init functions skip this tensor, while any real computation on it fails loudly.
        """
        w = torch.empty(self.out_features, self.in_features, device="meta", dtype=self.scales.dtype)
        w._is_hf_initialized = True
        return w

    def _reset_state(self) -> None:
        self._state = None
        self._perm = None
        self.backend_name = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to() / .half() / .cuda() replace the buffers: the prepared state is stale after it.
        self._reset_state()
        return super()._apply(fn, recurse)

    def _input_order(self) -> Optional[torch.Tensor]:
        """None when ``g_idx`` is absent or ``i // group_size``; for an act-order (``desc_act=True``) checkpoint,
        the input permutation ``perm`` (int64 ``[in]``) that puts each group's channels side by side: channel
        ``perm[j]`` belongs to group ``j // group_size``. Refuses a ``g_idx`` that is not such a grouping."""
        if self.g_idx is None:
            return None
        g_idx = self.g_idx.to(torch.int64)
        expected = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        if torch.equal(g_idx, expected):
            return None
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], expected):
            counts = torch.bincount(g_idx.clamp(min=0), minlength=n_groups(self.in_features, self.group_size))
            raise ValueError(
                f"g_idx of a [{self.out_features}, {self.in_features}] layer does not give every group "
                f"group_size={self.group_size} input channels (values {int(g_idx.min())}..{int(g_idx.max())}, "
                f"group sizes {sorted(set(counts.tolist()))}): the file's g_idx was not written for this "
                "group size; re-export it")
        return perm

    def _permuted(self, p: PackedTensors, perm: torch.Tensor) -> PackedTensors:
        """``p`` with its input channels in the order ``perm`` (groups then contiguous, as the backends expect)."""
        codes = unpack_bits(p.qweight, p.bits, dim=0, length=p.in_features)
        return p._replace(qweight=pack_bits(codes.index_select(0, perm.to(codes.device)), p.bits, dim=0))

    def select(self) -> Backend:
        """The backend that would run this layer on its buffers' current device."""
        return select_backend(
            self.qweight.device,
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
            requested=self.backend,
        )

    def post_init(self) -> None:
        """Choose the backend for the buffers' device and prepare its packed weight once."""
        if self._awaiting:
            raise ValueError(f"the checkpoint has no {', '.join(sorted(self._awaiting))} of the right shape for "
                             f"this quantized [{self.out_features}, {self.in_features}] layer (bits={self.bits}, "
                             f"group_size={self.group_size}, packing {self.packing_format!r}): the file is incomplete "
                             "or was written for another scheme; re-export it")
        if self.qweight.is_meta or self.scales.is_meta:
            raise RuntimeError(
                "QuantLinear buffers are still on the meta device: the checkpoint did not "
                "provide qweight/qzeros/scales for this layer"
            )
        perm = self._input_order()
        backend = self.select()
        with torch.no_grad():
            packed = self.packed()
            self._state = backend.prepare(packed if perm is None else self._permuted(packed, perm))
        self._perm = perm
        self._matmul = backend.matmul
        self._state_device = self.qweight.device
        self.backend_name = backend.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``."""
        if self._state is None or self._state_device != self.qweight.device:
            self.post_init()
        if self._perm is not None:  # act-order checkpoint: the inputs follow the channels' permuted order
            x = x.index_select(-1, self._perm)
        y = self._matmul(self._state, x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
            f"bias={self.bias is not None}, packing_format={self.packing_format!r}, "
            f"backend={self.backend_name or self.backend!r}"
        )
