"""Incremental extraction: `featcache extract --update` keeps rows of images still there, computes
new ones, drops removed ones, and ends equal to a fresh extraction of the data as it is now."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache as fc
from featcache_cli.main import cli
from tests.conftest import render_digits, write_manifest as _manifest


def _extract(model: Path, data: Path, out: Path, *extra: str) -> str:
    res = CliRunner().invoke(cli, ["extract", "-m", str(model), "-d", str(data), "-o", str(out), "--dtype",
                                   "float32", "--workers", "0", "--batch-size", "8", "-q", *extra])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture()
def digits_manifest(tmp_path) -> tuple[Path, list[tuple[str, str, str]]]:
    root = render_digits(tmp_path / "img", per_class=8, classes=(0, 1, 2, 3), splits=("train", "test"))
    rows = sorted((p.relative_to(tmp_path).as_posix(), p.parent.name, p.parent.parent.name)
                  for p in root.rglob("*.png"))
    return tmp_path / "data.csv", rows


def _assert_equal_files(a: Path, b: Path) -> None:
    with fc.open(a) as x, fc.open(b) as y:
        assert x.splits == y.splits and x.classes == y.classes and x.fingerprint == y.fingerprint
        for s in x.splits:
            assert x[s].paths == y[s].paths
            np.testing.assert_array_equal(x[s].labels, y[s].labels)
            assert x[s].done.all() and y[s].done.all()
            # float32 features of the same images; batches differ between the runs (float rounding)
            np.testing.assert_allclose(x[s].cls[()], y[s].cls[()], atol=1e-5)
            np.testing.assert_allclose(x[s].pooled[()], y[s].pooled[()], atol=1e-5)


def test_update_equals_a_fresh_extraction(tiny_vit, digits_manifest, tmp_path):
    manifest, rows = digits_manifest
    _manifest(manifest, rows[:-6])                        # last month's data: 6 images not there yet
    out = tmp_path / "feats.h5"
    _extract(tiny_vit, manifest, out)
    _manifest(manifest, rows)                              # the data grew: without --update, refused
    refused = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out),
                                       "--dtype", "float32", "--workers", "0", "-q"])
    assert refused.exit_code == 1 and "--update" in refused.output
    # this week: 6 new images, 3 removed, one moved from train to test, one relabelled
    now = [list(r) for r in rows[3:]]
    now[0][2] = "test" if now[0][2] == "train" else "train"
    now[1][1] = "3" if now[1][1] != "3" else "0"
    _manifest(manifest, [tuple(r) for r in now])
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out), "--dtype",
                                   "float32", "--workers", "0", "--update", "--json", str(tmp_path / "u.json")])
    assert res.exit_code == 0, res.output
    import json

    summary = json.loads((tmp_path / "u.json").read_text())
    assert summary["updated"] and summary["rows_computed"] == 6
    assert summary["rows_reused"] == len(now) - 6 and summary["rows_dropped"] == 3
    assert summary["rows_total"] == sum(summary[k] for k in ("rows_done_before", "rows_reused", "rows_computed",
                                                             "rows_failed", "rows_failed_before"))  # README
    assert "updated (" in res.output and not (tmp_path / "feats.h5.updating").exists()
    assert "already done" not in res.output  # was '0 already done' beside the reused rows
    fresh = tmp_path / "fresh.h5"
    _extract(tiny_vit, manifest, fresh)
    _assert_equal_files(out, fresh)
    again = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out), "--dtype",
                                     "float32", "--workers", "0", "--update", "-q"])
    assert again.exit_code == 0 and "nothing left to compute" in again.output   # unchanged data: a plain resume


def test_update_refuses_another_configuration(tiny_vit, digits_manifest, tmp_path):
    manifest, rows = digits_manifest
    _manifest(manifest, rows[:-2])
    out = tmp_path / "feats.h5"
    _extract(tiny_vit, manifest, out)
    _manifest(manifest, rows)
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out),
                                   "--dtype", "float16", "--workers", "0", "--update", "-q"])
    assert res.exit_code == 1 and "--update keeps rows of the same model and settings" in res.output


def _cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "featcache", "extract", "--model", str(model), "--data", str(data), "--out",
            str(out), "--workers", "0", "--batch-size", "4", "--dtype", "float32", "--quiet", "--update"]


def test_update_survives_sigkill(tiny_vit, tmp_path):
    """kill -9 while an update computes new rows: OUT is untouched, and the same command completes it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "jpegs"
    for c, n in (("cat", 100), ("dog", 400)):
        (data / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(data / c / f"{i:03d}.jpg")
    keep = tmp_path / "kept"
    shutil.move(str(data / "dog"), str(keep))             # first extraction: cats only
    out = tmp_path / "feats.h5"
    subprocess.run(_cmd(tiny_vit, data, out), check=True)
    before = out.read_bytes()
    shutil.move(str(keep), str(data / "dog"))             # then the dogs arrive
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    proc = subprocess.Popen(_cmd(tiny_vit, data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = out.with_name(out.name + ".updating")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if tmp.exists() and tmp.stat().st_size > 0:
            time.sleep(0.05)  # into the copy of the cats' rows or the first dog batches
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the update finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == before                      # the old file is intact until the update is complete
    done = subprocess.run(_cmd(tiny_vit, data, out), env=env, check=True, capture_output=True, text=True)
    assert "updated" in done.stdout and not tmp.exists()
    fresh = tmp_path / "fresh.h5"
    subprocess.run(_cmd(tiny_vit, data, fresh)[:-1], check=True)
    _assert_equal_files(out, fresh)


def test_an_interrupted_update_resumes_with_honest_counts(tiny_vit, digits_manifest, tmp_path, monkeypatch):
    """Ctrl-C during an update said "64 of 64 rows are saved in OUT" (the old, complete file) instead
    of what the update had saved; its resume counted every done row of OUT.updating as reused from
    the old file, the new rows it had computed too (reused + dropped exceeded the old file's rows)."""
    import json

    from featcache import extraction

    manifest, rows = digits_manifest
    old_rows, new_rows = rows[:40], rows
    out = tmp_path / "f.h5"
    _extract(tiny_vit, _manifest(manifest, old_rows), out)
    _manifest(manifest, new_rows)
    real = extraction._extract_items

    def cut(items, *args, **kwargs):
        real(items[:8], *args, **kwargs)  # one batch of the new images, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(extraction, "_extract_items", cut)
        res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out), "--dtype",
                                       "float32", "--workers", "0", "--batch-size", "8", "-q", "--update"])
    assert res.exit_code == 1
    assert f"48 of {len(new_rows)} rows are saved in {out}.updating (the update; {out} is unchanged" in res.output
    with fc.open(out) as store:
        assert sum(int(store[s].done.sum()) for s in store.splits) == 40  # OUT as it was
    _extract(tiny_vit, manifest, out, "--update", "--json", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rows_reused"] == 40 and summary["rows_computed"] == len(new_rows) - 48
    assert summary["rows_dropped"] == 0 and summary["rows_changed"] == 0
    # the 8 rows the interrupted run computed are done before, so the README's sum holds
    assert summary["rows_done_before"] == 8
    assert summary["rows_total"] == sum(summary[k] for k in ("rows_done_before", "rows_reused", "rows_computed",
                                                             "rows_failed", "rows_failed_before"))
    fresh = tmp_path / "fresh.h5"
    _extract(tiny_vit, manifest, fresh)
    _assert_equal_files(out, fresh)


def test_changes_an_interrupted_update_computed_are_counted_as_changed(tiny_vit, digits_manifest, tmp_path,
                                                                      monkeypatch):
    """Two images changed in place and the update computing them again was interrupted: the
    finishing run said rows_changed 0 (and its counts missed the rows the first run computed)."""
    import json

    from PIL import Image

    from featcache import extraction

    manifest, rows = digits_manifest
    out = tmp_path / "f.h5"
    _extract(tiny_vit, _manifest(manifest, rows[:40]), out)
    for rel, _, _ in rows[:2]:   # new pixels under the same names
        img = tmp_path / rel
        Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    _manifest(manifest, rows)
    real = extraction._extract_items

    def cut(items, *args, **kwargs):
        real(items[:-1], *args, **kwargs)   # all but the last pending image, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(extraction, "_extract_items", cut)
        res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out), "--dtype",
                                       "float32", "--workers", "0", "--batch-size", "8", "-q", "--update"])
    assert res.exit_code == 1 and "2 changed since extracted" not in res.output
    _extract(tiny_vit, manifest, out, "--update", "--json", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rows_changed"] == 2 and summary["rows_reused"] == 38 and summary["rows_computed"] == 1
    assert summary["rows_done_before"] == len(rows) - 38 - 1
    assert summary["rows_total"] == sum(summary[k] for k in ("rows_done_before", "rows_reused", "rows_computed",
                                                             "rows_failed", "rows_failed_before"))
    fresh = tmp_path / "fresh.h5"
    _extract(tiny_vit, manifest, fresh)
    _assert_equal_files(out, fresh)


def test_update_copies_stored_float16_rows_as_they_are(tiny_vit, digits_manifest, tmp_path):
    """The float16-underflow refusal (for computed rows) also refused --update's copies of rows a
    file already held, with advice to re-extract in float32."""
    import h5py

    manifest, rows = digits_manifest
    out = tmp_path / "f.h5"
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(_manifest(manifest, rows[:-2])), "-o",
                                   str(out), "--dtype", "float16", "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    with h5py.File(out, "r+") as f:   # a row as an older featcache could store it
        split = next(k for k in f if k != "classes")
        f[split]["cls"][0] = np.full(f[split]["cls"].shape[1], 1e-5, dtype=np.float16)
        kept = f[split]["cls"][0].copy()
    _manifest(manifest, rows)
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(manifest), "-o", str(out), "--dtype",
                                   "float16", "--workers", "0", "-q", "--update"])
    assert res.exit_code == 0, res.output
    with h5py.File(out, "r") as f:
        assert any(np.array_equal(f[s]["cls"][i], kept) for s in f if s != "classes" for i in range(f[s]["cls"].shape[0]))
