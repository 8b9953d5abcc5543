"""Distributed extraction: torchrun with 2 CPU processes (gloo) equals a single-process run."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import featcache as fc


def _extract(args: list[str], out, model, data, nproc: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 "-m", "featcache"] if nproc > 1 else [sys.executable, "-m", "featcache"])
    cmd = launcher + ["extract", "--model", str(model), "--data", str(data), "--out", str(out),
                      "--workers", "0", "--batch-size", "8", "--dtype", "float32", "--tokens", "full",
                      "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("merge", ["copy", "virtual"])
def test_torchrun_two_ranks_equals_single_process(merge, tiny_vit, digits_dir, tmp_path):
    single = _extract([], tmp_path / "single.h5", tiny_vit, digits_dir, 1)
    assert single.returncode == 0, single.stderr
    run = _extract(["--merge", merge, "--json", str(tmp_path / "s.json")], tmp_path / "merged.h5", tiny_vit,
                   digits_dir, 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1 of 2" in run.stdout
    import json  # one summary per rank (they raced on one file before)

    summaries = [json.loads((tmp_path / f"s.rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["world"] == 2 for s in summaries)
    assert sum(s["rows_computed"] for s in summaries) == sum(s["rows_total"] for s in summaries)
    assert (tmp_path / "merged.shard-00000-of-00002.h5").exists()
    with fc.open(tmp_path / "merged.h5") as merged, fc.open(tmp_path / "single.h5") as ref:
        assert merged.splits == ref.splits and merged.fingerprint == ref.fingerprint
        for split in ref.splits:
            m, r = merged[split], ref[split]
            assert m.done.all()
            assert m.paths == r.paths
            np.testing.assert_array_equal(m.labels, r.labels)
            for key in ("cls", "pooled", "tokens"):
                np.testing.assert_allclose(getattr(m, key)[()], getattr(r, key)[()], atol=1e-5)
        if merge == "virtual":
            assert merged["train"].cls.is_virtual
