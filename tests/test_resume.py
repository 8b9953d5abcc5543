"""Crash safety: SIGKILL `featcache extract` mid-run, reopen, resume, compare to a clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featcache as fc


@pytest.fixture(scope="module")
def noisy_jpegs(tmp_path_factory) -> Path:
    """400 random 192 px JPEGs in two classes: enough work to be caught mid-run."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(200):
            Image.fromarray(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.jpg")
    return root


def _done_rows(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(sum(f[k]["done"][()].sum() for k in f if isinstance(f[k], h5py.Group)))
    except (OSError, KeyError):
        return 0


def _cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "featcache", "extract", "--model", str(model), "--data", str(data),
            "--out", str(out), "--workers", "0", "--batch-size", "4", "--dtype", "float32", "--quiet"]


def test_extract_resumes_after_sigkill(tiny_vit, noisy_jpegs, tmp_path):
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    out = tmp_path / "killed.h5"
    seen = 0
    for _ in range(2):  # kill it twice, at different points of the run
        proc = subprocess.Popen(_cmd(tiny_vit, noisy_jpegs, out), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and _done_rows(out) >= seen + 40:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "extraction finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _done_rows(out)
        assert seen < done < 400
        seen = done
    # the killed file opens, and every done row is already correct
    clean = tmp_path / "clean.h5"
    subprocess.run(_cmd(tiny_vit, noisy_jpegs, clean), env=env, check=True)
    with fc.open(out) as partial, fc.open(clean) as ref:
        s, r = partial["all"], ref["all"]
        done = s.done
        assert 0 < done.sum() < 400
        np.testing.assert_allclose(s.cls[()][done], r.cls[()][done], atol=1e-5)
    resumed = subprocess.run(_cmd(tiny_vit, noisy_jpegs, out), env=env, check=True, capture_output=True, text=True)
    assert "resumed" in resumed.stdout and f"{seen} already done" in resumed.stdout
    with fc.open(out) as partial, fc.open(clean) as ref:
        s, r = partial["all"], ref["all"]
        assert s.done.all()
        assert s.paths == r.paths
        np.testing.assert_array_equal(s.labels, r.labels)
        np.testing.assert_allclose(s.cls[()], r.cls[()], atol=1e-5)
        np.testing.assert_allclose(s.pooled[()], r.pooled[()], atol=1e-5)
