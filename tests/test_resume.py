"""Resume: a run killed with SIGKILL restarts from its last tuned block and ends bit-identical to an
uninterrupted run; a resume folder from other inputs is refused, naming what differs."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auto_round import AutoRound
from auto_round.tuning.resume import default_resume_dir
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

TESTS = Path(__file__).resolve().parent
SCRIPT = """
import sys, logging, torch
sys.path.insert(0, {tests!r})
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
from auto_round import AutoRound
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer
ar = AutoRound(tiny_llama(layers=6), make_tokenizer(), bits=2, group_size=32, iters={iters}, nsamples=8, seqlen=32,
               batch_size=4, dataset="auto_round:offline_corpus")
ar.quantize_and_save({out!r}, inplace=False)
"""


def _start(out: Path, iters: int = 60) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(TESTS), out=str(out), iters=iters)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sha(out: Path) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_sigkilled_run_resumes_to_a_bit_identical_checkpoint(tmp_path):
    whole = tmp_path / "whole"
    proc = _start(whole)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    killed = tmp_path / "killed"
    resume = default_resume_dir(killed)
    proc = _start(killed)
    deadline = time.time() + 600
    while not (resume / "unit-00002.pt").exists():  # three of six blocks tuned
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists() and resume.is_dir()
    proc = _start(killed)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert "resuming from" in log and "model.layers.0: resumed" in log and "model.layers.5: resumed" not in log
    assert _sha(killed) == _sha(whole)
    assert not resume.exists()  # removed once the checkpoint was complete


def test_resume_folder_of_another_run_is_refused_naming_the_difference(tmp_path):
    kw = dict(bits=2, group_size=32, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")
    AutoRound(tiny_llama(), make_tokenizer(), iters=3, **kw).quantize(resume_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"other inputs: iters: saved 3, now 4"):
        AutoRound(tiny_llama(), make_tokenizer(), iters=4, **kw).quantize(resume_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="model differs"):
        AutoRound(tiny_llama(seed=1), make_tokenizer(), iters=3, **kw).quantize(resume_dir=str(tmp_path / "r"))
    again = AutoRound(tiny_llama(), make_tokenizer(), iters=3, **kw).quantize(resume_dir=str(tmp_path / "r"))
    assert len(again.block_results) == 2  # both blocks reused
