"""How many CPUs a worker may use (taskstack/worker/cpus.py), inside a container or not."""

from __future__ import annotations

from pathlib import Path

from taskstack.worker.cpus import available_cpus, cgroup_quota


def test_cgroup_quota_v2(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None


def test_cgroup_quota_v1_and_missing(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_quota(tmp_path) == 0.5
    assert available_cpus(tmp_path) == 1
