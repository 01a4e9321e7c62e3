"""Where the calibration cache lives: files under ``offload_dir`` (:class:`auto_round.calib.store.TensorStore`)
and, on CUDA, CPU memory with ``low_gpu_mem_usage``.

The CPU tests check the files themselves (a view is saved as its own bytes, not its base's), that offload changes
no record of optimized RTN (iters 0; iters > 0: ``test_tuning.test_disk_offload_writes_files_...``) and that the
public keyword reaches the block loop. The GPU test (``-m gpu``, deselected by default) measures what
``low_gpu_mem_usage`` is for: the peak GPU memory of a run whose cache would be several hundred MiB on the GPU.
"""

import pytest
import torch

from auto_round.calib.store import DiskTensor, TensorStore
from auto_round.config import build_settings
from auto_round.tuning.loop import quantize_model
from auto_round.tuning.plan import resolve_plan
from tiny_models import tiny_llama

CPU = torch.device("cpu")
MIB = 2 ** 20
pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n, seqlen, bs, device=CPU, seed=0, vocab=512):
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i:i + bs].to(device)} for i in range(0, n, bs)]


def _run(model, device=CPU, data=None, **kw):
    s = build_settings(**{"group_size": 32, "nsamples": 16, "seqlen": 32, "batch_size": 8, **kw})
    plan = resolve_plan(model, s, ["model.layers"])
    data = _batches(16, 32, 8) if data is None else data
    return quantize_model(model, plan, s, lambda: data, device, progress=False)


def _same_layers(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scale, b[k].scale)
                                        and torch.equal(a[k].zero, b[k].zero) for k in a)


# ------------------------------------------------------------------------------------------ the files
def test_a_view_is_saved_as_its_own_bytes_not_its_base(tmp_path):
    """A slice or a split part shares its base's storage, and ``torch.save`` writes the whole storage: before the
    fix, each of 8 parts of one ``[8, 512, 64]`` tensor wrote (and read back) all 8 parts' bytes."""
    base = torch.randn(8, 512, 64)
    parts = base.split(1)  # what a unit whose input is one tensor per image can be handed
    store = TensorStore(CPU, tmp_path)
    try:
        saved = store.put(parts)
        assert isinstance(saved, tuple) and all(isinstance(d, DiskTensor) for d in saved)
        own = parts[0].numel() * parts[0].element_size()
        for d, p in zip(saved, parts):
            assert d.path.stat().st_size < 1.1 * own + 4096, (d.path.stat().st_size, own)
            back = d.to(CPU)
            assert torch.equal(back, p) and back.untyped_storage().nbytes() == own
        sliced = store.put(base[:, 1:])  # e.g. a vision tower's patches without the CLS token
        assert torch.equal(sliced.to(CPU), base[:, 1:]) and sliced.shape == (8, 511, 64)
    finally:
        store.close()
    assert not any(tmp_path.iterdir())  # the private sub-folder is gone


def test_a_whole_tensor_is_saved_as_is(tmp_path):
    """No copy for a tensor that owns its storage, whatever its strides (a transposed one keeps them)."""
    store = TensorStore(CPU, tmp_path)
    try:
        x = torch.randn(64, 32).t()
        d = store.put(x)
        back = d.to(CPU, torch.float32)
        assert torch.equal(back, x) and back.stride() == x.stride() and d.dtype == torch.float32
        assert d.to(CPU, torch.bfloat16).dtype == torch.bfloat16
    finally:
        store.close()


def _recording_puts(monkeypatch) -> list:
    """Every value :meth:`TensorStore.put` returns from here on, in a list."""
    stored, real_put = [], TensorStore.put

    def put(self, tensor):
        stored.append(real_put(self, tensor))
        return stored[-1]

    monkeypatch.setattr(TensorStore, "put", put)
    return stored


def test_offload_changes_no_opt_rtn_record_and_keeps_no_cached_tensor_in_memory(tmp_path, monkeypatch):
    """iters 0 (optimized RTN: its own forwards, clip-search and plain-RTN candidates): the same records and
    output errors with the cache in files; every block input/output the loop caches is a file, all removed after."""
    la, ra = _run(tiny_llama(), bits=2, iters=0)
    stored = _recording_puts(monkeypatch)
    cache = tmp_path / "cache"
    lb, rb = _run(tiny_llama(), bits=2, iters=0, offload_dir=str(cache))
    assert stored and all(isinstance(t, DiskTensor) for t in stored), [type(t) for t in stored]
    assert _same_layers(la, lb)
    assert ra and [(r.first_loss, r.best_loss) for r in ra] == [(r.first_loss, r.best_loss) for r in rb]
    assert list(cache.iterdir()) == []


def test_the_public_keyword_puts_the_cache_in_files(model_dir, tmp_path, monkeypatch):
    """``AutoRound(..., offload_dir=...)`` on a saved model: the cache goes to files under that folder."""
    from auto_round import AutoRound

    stored = _recording_puts(monkeypatch)
    cache = tmp_path / "cache"
    ar = AutoRound(str(model_dir), bits=4, group_size=32, iters=1, nsamples=4, seqlen=32, batch_size=2,
                   dataset="auto_round:offline_corpus", offload_dir=str(cache))
    ar.quantize()
    assert stored and all(isinstance(t, DiskTensor) and cache in t.path.parents for t in stored)
    assert len(ar.summary["blocks"]) == 2 and list(cache.iterdir()) == []


def test_files_are_freed_block_by_block_and_the_capture_stores_each_batch_at_once(tmp_path, monkeypatch):
    """With ``offload_dir``, a unit's cached inputs are deleted once the next unit's are computed: the folder holds
    the copies in use, the same count after the last of 6 blocks as after the second (before: one more set of
    files per block, 1.3 TB at 72B). And the capture hands each batch's hidden state to the store as soon as it is
    captured, so the whole first input is never in memory at once."""
    from auto_round.tuning import loop

    counts, puts = [], []
    real_unit, real_capture = loop._tune_unit, loop.capture_block_inputs

    def unit(run, *a, **k):
        out = real_unit(run, *a, **k)
        counts.append(sum(1 for _ in tmp_path.rglob("*.pt")))
        return out

    def capture(*a, put=None, **k):
        def recorded(h):
            puts.append(len(puts))
            return put(h)
        return real_capture(*a, put=recorded, **k)

    monkeypatch.setattr(loop, "_tune_unit", unit)
    monkeypatch.setattr(loop, "capture_block_inputs", capture)
    data = _batches(16, 32, 4)  # 4 batches
    layers_off, _ = _run(tiny_llama(layers=6), data=data, bits=4, iters=2, offload_dir=str(tmp_path), batch_size=4)
    assert puts == [0, 1, 2, 3]
    assert len(counts) == 6 and max(counts) <= 3 * 4 and counts[-1] <= counts[1], counts  # measured: 12 after each unit; before: 12 up to 52
    monkeypatch.undo()
    layers_mem, _ = _run(tiny_llama(layers=6), data=data, bits=4, iters=2, batch_size=4)
    assert _same_layers(layers_off, layers_mem)
    assert not any(tmp_path.rglob("*.pt"))


# ------------------------------------------------------------------------------------------ GPU
def _llama(hidden: int, layers: int = 3):
    """A random Llama like ``tiny_models.tiny_llama`` but wider, with eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_low_gpu_mem_usage_keeps_the_cache_off_the_gpu_with_the_same_records():
    """CUDA: a tiny Llama (hidden 256, 3 blocks) with a 64 MiB-per-copy cache (128 x 512 tokens, float32).

    By default the cache is on the GPU: while a later unit is tuned its FP and quantized inputs and its FP
    targets are there (3 copies), then its quantized outputs too (4). ``low_gpu_mem_usage`` keeps them on the
    CPU and moves one batch at a time, so its peak GPU memory must be lower by most of those 3 copies (2.4 here,
    a 16th of a copy per batch is allowed twice over); the records must be identical (eager attention: no
    atomics-based kernels, so the two runs do the same arithmetic)."""
    dev = torch.device("cuda")
    nsamples, seqlen, bs, hidden = 128, 512, 8, 256
    copy_bytes = nsamples * seqlen * hidden * 4
    data = _batches(nsamples, seqlen, bs, dev)
    kw = dict(bits=4, group_size=128, iters=2, nsamples=nsamples, seqlen=seqlen, batch_size=bs)
    peaks, layers = {}, {}
    for low in (False, True):
        model = _llama(hidden).to(dev)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layers[low], _ = _run(model, dev, data, low_gpu_mem_usage=low, **kw)
        torch.cuda.synchronize()
        peaks[low] = torch.cuda.max_memory_allocated() - base
        del model
    saved = peaks[False] - peaks[True]
    assert saved >= 2.4 * copy_bytes, (f"peak GPU memory above the model: default {peaks[False] / MIB:.0f} MiB, "
                                       f"low_gpu_mem_usage {peaks[True] / MIB:.0f} MiB; one cache copy "
                                       f"{copy_bytes / MIB:.0f} MiB")
    assert _same_layers(layers[False], layers[True])
