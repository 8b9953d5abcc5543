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


def _summaries(tmp_path, name: str) -> list[dict]:
    import json

    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


def test_torchrun_refuses_a_file_of_other_settings_and_resumes_or_updates_what_is_stored(tiny_vit, digits_dir, tmp_path):
    """torchrun replaced an existing OUT made with another dtype without --overwrite (rank 0 always merged
    with overwrite), never reused a file one process made, and an --update after images that sort first
    were added counted rows that only moved to the next rank as 'dropped' and computed them again."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    out = tmp_path / "f.h5"
    assert _extract(["--dtype", "float16"], out, tiny_vit, data, 1).returncode == 0
    before = out.read_bytes()
    refused = _extract([], out, tiny_vit, data, 2)  # float32 (the helper's dtype)
    assert refused.returncode != 0 and "differ in: dtype" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_bytes() == before
    resumed = _extract(["--dtype", "float16", "--json", str(tmp_path / "r.json")], out, tiny_vit, data, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sum(s["rows_computed"] for s in _summaries(tmp_path, "r")) == 0  # the one-process file's rows, reused

    rng = np.random.default_rng(0)
    for i in range(6):  # names sorting first: every rank's share of train moves
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(data / "train" / "0" / f"-{i}.png")
    updated = _extract(["--dtype", "float16", "--update", "--json", str(tmp_path / "u.json")], out, tiny_vit, data, 2)
    assert updated.returncode == 0, updated.stderr[-3000:]
    summaries = _summaries(tmp_path, "u")
    assert sum(s["rows_computed"] for s in summaries) == 6 and sum(s["rows_dropped"] for s in summaries) == 0
    assert sum(s["rows_reused"] for s in summaries) == 60
    fresh = tmp_path / "fresh.h5"
    assert _extract(["--dtype", "float16"], fresh, tiny_vit, data, 1).returncode == 0
    with fc.open(out) as merged, fc.open(fresh) as ref:
        for split in ref.splits:
            assert merged[split].paths == ref[split].paths and merged[split].done.all()
            for key in ("cls", "pooled", "tokens"):
                np.testing.assert_array_equal(getattr(merged[split], key)[()], getattr(ref[split], key)[()])


def test_torchrun_keeps_known_unreadable_rows_and_reads_a_virtual_out_of_another_world_size(tiny_vit, digits_dir,
                                                                                             tmp_path):
    """torchrun over a one-process file retried its unreadable image without --retry-errors (only finished
    rows were taken over), and at another world size over a --merge virtual OUT computed every row again."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "train" / "0" / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "f.h5"
    assert _extract([], out, tiny_vit, data, 1).returncode == 0
    two = _extract(["--merge", "virtual", "--json", str(tmp_path / "two.json")], out, tiny_vit, data, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = _summaries(tmp_path, "two")
    assert sum(s["rows_computed"] for s in summaries) == 0 and sum(s["rows_failed"] for s in summaries) == 0
    assert sum(s["rows_failed_before"] for s in summaries) == 1 and sum(s["rows_done_before"] for s in summaries) == 60
    with fc.open(out) as f:
        assert f["train"].cls.is_virtual and f["train"].errors[0][0] == "train/0/zz_broken.png"
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m",
                            "featcache", "extract", "--model", str(tiny_vit), "--data", str(data), "--out", str(out),
                            "--workers", "0", "--batch-size", "8", "--dtype", "float32", "--tokens", "full", "--quiet",
                            "--json", str(tmp_path / "three.json")], capture_output=True, text=True, timeout=300)
    assert three.returncode == 0, three.stderr[-3000:]
    import json

    counts = [json.loads((tmp_path / f"three.rank{r}.json").read_text()) for r in range(3)]
    assert sum(s["rows_computed"] for s in counts) == 0 and sum(s["rows_done_before"] for s in counts) == 60
    with fc.open(out) as merged, fc.open(tmp_path / "f.shard-00000-of-00002.h5") as old:
        np.testing.assert_array_equal(merged["test"].cls[:len(old["test"].cls)], old["test"].cls[()])
