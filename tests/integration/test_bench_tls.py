"""scripts/bench.py --tls-overhead for real, in small: a plain private stack and one over
TLS with Redis users (scripts/bench_tls.py), both measured, both stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_tls import MEASURES, MODES
from tests.support import ROOT, UNSET

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCRIPT = ROOT / "scripts" / "bench.py"


def test_tls_overhead_measures_both_stacks_and_their_ratio(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--workloads", "tiny", "--methods", "ClusterExecutor.map"]
    argv += ["--probes", "none", "--tiny", "200", "--latency-samples", "50", "--repeat", "1"]
    argv += ["--tls-overhead", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in UNSET}  # the caller's own stack
    done = subprocess.run(argv, cwd=ROOT, env=env, timeout=150, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Redis refused" not in done.stderr, done.stderr  # the ACL LOG of the TLS Redis

    result = json.loads((tmp_path / "bench.json").read_text())["tls_overhead"]
    assert result["items"] == 200 and result["repeat"] == 1
    for name in MEASURES:
        for mode in MODES:
            measured = result["modes"][mode][name]
            assert len(measured["runs"]) == 1 and measured["median"] > 0, (mode, name)
        ratio = result["tls_vs_plain"][name]
        assert ratio["median"] > 0, name
        tls, plain = (result["modes"][m][name]["median"] for m in ("tls", "plain"))
        assert ratio["median"] == pytest.approx(tls / plain)
    assert "TLS + ACL users vs plain Redis" in done.stdout
    assert "| tiny items through ClusterExecutor.map (s) |" in done.stdout
