"""Data-parallel tuning (:mod:`auto_round.tuning.parallel`): ``torchrun`` with 2 gloo processes on CPU, each
running half of every step's ``batch_size`` samples, must write the checkpoint of one process that runs
both halves as two micro-batches at every step (``DataParallel(2, (0, 1))`` at ``batch_size / 2``):
bit-identical with one micro-batch per process and step (the sum of two gradients is the same float in
either order), and with more micro-batches per step equal up to the rounding of differently grouped
float sums (codes at a tie may move by one level). Against a plain one-process run at the same settings
(the same samples in every step, as one batch) the results agree up to float rounding. Without the
all-reduce each process would step on its own half's gradients and write something else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auto_round import AutoRound
from auto_round.autoround import _check_parallel
from auto_round.config import build_settings
from auto_round.tuning.parallel import SINGLE, DataParallel, local_device
from checkpoints import checkpoint_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "auto_round:offline_corpus"
OPTS = dict(bits=4, group_size=32, iters=8, lr=0.05, nsamples=4, seqlen=32, batch_size=2, dataset=CORPUS,
            device="cpu", threads=1)
ROOT = Path(__file__).resolve().parent.parent


def _cli_args(opts):
    out = []
    for k, v in opts.items():
        if v is False:  # enable_x=False: the CLI's --disable_x
            out += [f"--disable_{k.removeprefix('enable_')}"]
        else:
            out += [f"--{k}", str(v)] if v is not True else [f"--{k}"]
    return out


def _torchrun(model_dir: Path, out: Path, opts, procs: int = 2) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m",
           "auto_round", "--model", str(model_dir), "--output_dir", str(out), *_cli_args(opts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folders = [p.parent for p in out.rglob("quantization_config.json")]
    assert len(folders) == 1, folders  # one checkpoint, written by rank 0 only
    return folders[0]


def _simulated(model_dir: Path, out: Path, opts, cls=AutoRound) -> Path:
    ar = cls(str(model_dir), **{**opts, "batch_size": opts["batch_size"] // 2})
    ar.parallel = DataParallel(2, (0, 1))  # one process, both shards, the same per-step grouping
    return ar.quantize_and_save(out, format="auto_round")[0]


def _blocks(folder: Path):
    return json.loads((folder / "quantization_report.json").read_text())["blocks"]


@pytest.mark.parametrize("ext", [None, False], ids=["extended-default", "plain"])
def test_two_gloo_processes_equal_one_process_bit_for_bit(model_dir, tmp_path, ext):
    """Both tuners. The extended one also sums the activation importance of its clip search over the processes:
    each process's float32 sums go into float64 totals, so the other summation order rounds to the same
    float32 importance (in float32 the searched clip factors differed, and 4% of the codes)."""
    opts = {**OPTS, **({} if ext is None else {"enable_alg_ext": ext})}
    dp = _torchrun(model_dir, tmp_path / "dp", opts)
    one = _simulated(model_dir, tmp_path / "one", opts)
    a, b = checkpoint_tensors(dp), checkpoint_tensors(one)
    assert sorted(a) == sorted(b) and len([k for k in a if k.endswith(".qweight")]) == 14
    assert [k for k in a if a[k] != b[k]] == []
    losses = [blk["losses"] for blk in _blocks(dp)]
    assert losses == [blk["losses"] for blk in _blocks(one)]
    assert any(blk["best_iter"] > 0 for blk in _blocks(dp))  # the tuning really moved
    assert json.loads((dp / "quantization_config.json").read_text())["batch_size"] == OPTS["batch_size"]
    # A plain run at the same settings sees the same samples in every step, as one batch of 2 instead of 2 of 1.
    # The bf16 autocast matmuls round differently at another batch shape, and sign descent turns those
    # differences into other (equally good) rounding choices: compared by loss (measured: within 2% on one
    # machine, 13% on another CPU, an AMD EPYC: how far depends on the CPU's bf16 matmul kernels).
    plain = AutoRound(str(model_dir), **opts).quantize_and_save(tmp_path / "plain", format="auto_round")[0]
    for x, y in zip(_blocks(dp), _blocks(plain)):
        assert x["best"] == pytest.approx(y["best"], rel=0.25) and x["best"] < 0.7 * x["first"]


def _code_agreement(a, b) -> float:
    same = total = 0
    for k in a:
        if k.endswith(".qweight"):
            x = torch.frombuffer(bytearray(a[k][2]), dtype=torch.uint8)
            y = torch.frombuffer(bytearray(b[k][2]), dtype=torch.uint8)
            # 8 4-bit codes per int32: compare nibbles
            xs = torch.stack([x & 15, x >> 4]).flatten()
            ys = torch.stack([y & 15, y >> 4]).flatten()
            same += int((xs == ys).sum())
            total += xs.numel()
    return same / total


@pytest.mark.parametrize("extra", [
    dict(gradient_accumulate_steps=2, nsamples=8),  # two micro-batches per process and step
    dict(iters=0, enable_alg_ext=True),  # optimized RTN: the activation importance summed over processes
], ids=["accumulate-2", "optimized-rtn"])
def test_two_processes_within_float_rounding(model_dir, tmp_path, extra):
    opts = {**OPTS, **extra}
    dp = _torchrun(model_dir, tmp_path / "dp", opts)
    one = _simulated(model_dir, tmp_path / "one", opts)
    a, b = checkpoint_tensors(dp), checkpoint_tensors(one)
    assert sorted(a) == sorted(b)
    assert _code_agreement(a, b) >= 0.999  # measured here: 1.0, every tensor identical
    for x, y in zip(_blocks(dp), _blocks(one)):
        assert x["best"] == pytest.approx(y["best"], rel=1e-3)


def test_shards_and_refusals(monkeypatch):
    dp = DataParallel(2, (1,))
    assert dp.own(range(6)) == [1, 3, 5] and dp.step_positions(2) == [2] and not dp.is_writer
    assert DataParallel(2, (0, 1)).own(range(4)) == [0, 1, 2, 3]
    assert DataParallel(2, (0, 1)).step_positions(1) == [2, 3]
    assert SINGLE.own("abc") == ["a", "b", "c"] and SINGLE.sum_floats(1.5, 2) == [1.5, 2.0]
    with pytest.raises(ValueError, match="5 calibration batches do not split evenly over 2"):
        dp.own(range(5))
    with pytest.raises(ValueError, match="shards must be indices"):
        DataParallel(2, (2,))
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        local_device("0,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda:0,cuda:1") == "cuda:1" and local_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="names 3 devices but torchrun started 2"):
        local_device("0,1,2")
    for opts, msg in [(dict(batch_size=3), "batch_size=3 does not split over 2 data-parallel processes"),
                      (dict(nsamples=5, batch_size=2), "nsamples=5 is not a multiple of batch_size=2"),
                      (dict(low_cpu_mem_usage=True), "low_cpu_mem_usage=True with 2 data-parallel"),
                      (dict(resume_dir="x"), "resume_dir='x' with 2 data-parallel")]:
        with pytest.raises(ValueError, match=msg):
            _check_parallel(build_settings(**opts), 2)
    _check_parallel(build_settings(nsamples=5, batch_size=3, iters=0, disable_opt_rtn=True), 2)  # no data used


def test_vlm_image_text_two_processes(tmp_path):
    """A VLM whose vision tower and language model are both tuned on image-text batches: the vision list
    runs first on each process's own batches and feeds its quantized output into the language capture."""
    from auto_round.mllm.autoround_mllm import AutoRoundMLLM
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()
    vlm.model.save_pretrained(tmp_path / "vlm")
    vlm.processor.save_pretrained(tmp_path / "vlm")
    opts = {**OPTS, "iters": 4, "seqlen": 128, "dataset": "auto_round:offline_image_text", "quant_nontext_module": True}
    script = Path(sys.executable).parent / "auto-round-mllm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           "--model", str(tmp_path / "vlm"), "--output_dir", str(tmp_path / "dp"), *_cli_args(opts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (dp,) = [p.parent for p in (tmp_path / "dp").rglob("quantization_config.json")]
    one = _simulated(tmp_path / "vlm", tmp_path / "one", opts, AutoRoundMLLM)
    a, b = checkpoint_tensors(dp), checkpoint_tensors(one)
    assert any(k.startswith(("visual.", "model.visual.")) and k.endswith(".qweight") for k in a)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
