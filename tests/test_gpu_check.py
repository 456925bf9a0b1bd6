"""bench/gpu_check.sh, dry-run on the CPU at a tiny size: every step runs, the
profile step writes its table and JSON (time by category, the SDPA backend, the
front end's share), and every layout agrees with fp32. A GPU session then has
one call to make, not a script to debug."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_a_dry_run_on_the_cpu_profiles_and_checks_every_layout(tmp_path):
    environment = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SHAPES": "tiny",
        "GPU_CHECK_DTYPE": "fp32",
        "GPU_CHECK_WHEELS": "none",
        "GPU_CHECK_REQUESTS": "1",
        "GPU_CHECK_BUDGET": "512",
        "GPU_CHECK_VARIANTS": "padded packed eager/packed",
        "GPU_CHECK_PROFILE_LAYOUTS": "padded packed",
        "GPU_CHECK_CHECKPOINTS": str(tmp_path / "models"),
        "GPU_CHECK_PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "=== done" in output and "stopped at" not in output, output[-3000:]
    assert "skipped" in (tmp_path / "out" / "test_gpu.txt").read_text()  # no CUDA here

    profile = json.loads((tmp_path / "out" / "profile_tiny.json").read_text())
    assert not profile["failed"] and [r["layout"] for r in profile["layouts"]] == ["padded", "packed"]
    for result in profile["layouts"]:
        times = result["device_s_by_category"]
        assert times["attention"] > 0 and times["gemm"] > 0
        assert sum(times.values()) <= result["profiled_wall_s"]
        assert result["sdpa_backends"] and result["batches"] >= 1 and result["engine_pairs_per_s"] > 0
    padded = profile["layouts"][0]
    assert padded["device_s_by_category"]["index (head kv copy)"] > 0  # the head's keys and values, copied
    assert all(profile["front_end"][f"{part}_s_per_pair"] > 0 for part in ("tokenize", "plan", "frame"))
    assert "front end, one thread, per pair" in output and "SDPA backends: flash (CPU)" in output

    layouts = json.loads((tmp_path / "out" / "layouts_tiny.json").read_text())
    assert [r["variant"] for r in layouts["results"]] == ["padded", "packed", "eager/packed"]
    for result in layouts["results"]:
        assert "error" not in result, result
        assert result["max_abs_logit_diff"] < 1e-4 and result["spearman"] > 0.999
