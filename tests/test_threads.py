"""Thread count from the cores really available, --threads, and the passive OpenMP wait of the CLI."""

import os
import subprocess
import sys

import pytest
import torch

from auto_round import threads
from auto_round.config import build_settings


def test_cgroup_quota_is_read_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(v2=v2) == 1.5
    v2.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(v2=v2) is None
    q, per = tmp_path / "q", tmp_path / "p"
    q.write_text("50000")
    per.write_text("100000")
    assert threads.cgroup_cpu_limit(v2=tmp_path / "absent", v1_quota=q, v1_period=per) == 0.5
    q.write_text("-1")
    assert threads.cgroup_cpu_limit(v2=tmp_path / "absent", v1_quota=q, v1_period=per) is None
    v2.write_text("garbage")
    assert threads.cgroup_cpu_limit(v2=v2) is None


def test_available_cpus_is_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cpus() == 4
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.1)
    assert threads.available_cpus() == 1


def test_resolve_and_apply(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.resolve_threads(None) == 2
    assert threads.resolve_threads(1) == 1
    with pytest.raises(ValueError, match="threads=0"):
        threads.resolve_threads(0)
    with caplog.at_level("WARNING"):
        assert threads.resolve_threads(8) == 8
    assert "exceeds the 2 core" in caplog.text
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.apply_threads(None) == 1  # never raised above what was set
        monkeypatch.setattr(threads, "available_cpus", lambda: 1)
        torch.set_num_threads(2)
        assert threads.apply_threads(None) == 1 and torch.get_num_threads() == 1  # lowered to the cores
        assert threads.apply_threads(2) == 2 and torch.get_num_threads() == 2  # explicit wins
    finally:
        torch.set_num_threads(n)


def test_threads_setting_is_checked():
    assert build_settings(threads=1).threads == 1
    with pytest.raises(ValueError, match="threads"):
        build_settings(threads=0)
    with pytest.raises(TypeError, match="threads"):
        build_settings(threads="2")


def test_cli_entry_sets_passive_wait_unless_set():
    code = ("import os, sys; from auto_round import _entry; _entry._prepare(); print(os.environ['OMP_WAIT_POLICY']); "
            "print('torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]  # set before torch is imported
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
