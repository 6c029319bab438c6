"""bench/gpu_check.sh --dry-run: the GPU check's every stage, on the CPU at tiny sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_the_final_table(tmp_path):
    environment = {**os.environ, "PYTHON": sys.executable, "KDCACHE_GPU_CHECK_OUT": str(tmp_path),
                   "OMP_NUM_THREADS": "1"}  # fmt: skip
    finished = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=environment)  # fmt: skip
    output = finished.stdout
    assert finished.returncode == 0, output[-3000:] + finished.stderr[-2000:]
    assert "DRY RUN" in output and "GPU: none (CPU)" in output
    assert re.search(r"gpu-tests: exit 0", output)  # the gpu tests ran and skipped cleanly
    assert "needs a CUDA device" in (tmp_path / "gpu-tests.log").read_text()
    smoke = (tmp_path / "train-smoke.log").read_text()  # SIGKILL in a save, then --resume
    assert re.search(r'RESULT .*"resumable": true', smoke), smoke[-2000:]
    table = output[output.index("=== summary") :]
    # at the dry run's tiny sizes a marginal build rate can drown in noise: "n/a", never an error
    for mode in ("top64", "default"):
        row = re.search(
            rf"\| build / bare forward\s+\|\s+2048 \| {mode}\s+\|\s+([0-9.]+|n/a) \|", table
        )
        assert row is not None, (mode, table)
    for mode in ("kd-top64", "kd-default"):
        row = re.search(rf"\| KD step / CE step\s+\|\s+2048 \| {mode}\s+\|\s+([0-9.]+) \|", table)
        assert row is not None, (mode, table)
        assert float(row.group(1)) > 0.0
