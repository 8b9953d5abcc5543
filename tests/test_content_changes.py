"""A feature file never keeps features of an image that changed: each row records the sha256 of
the bytes it was computed from (and the file's size and mtime), and a re-run, --update or resume
computes again every row whose input changed in place, under the same name."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache_cli.main import cli
from tests.conftest import render_digits, write_manifest as _manifest


def _extract(model: Path, data: Path, out: Path, tmp_path: Path, *extra: str) -> dict:
    summary = tmp_path / "summary.json"
    res = CliRunner().invoke(cli, ["extract", "-m", str(model), "-d", str(data), "-o", str(out), "--dtype",
                                   "float32", "--workers", "0", "--batch-size", "8", "--json", str(summary),
                                   *extra])
    assert res.exit_code == 0, res.output
    out_json = json.loads(summary.read_text())
    out_json["output"] = res.output
    return out_json


def _age(root: Path, seconds: float = 3600) -> None:
    """Date every file an hour back, as a dataset on disk for a while is (its mtimes are trusted)."""
    for f in root.rglob("*.png"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def _row(store: fc.FeatureStore, split: str, path: str) -> int:
    return store[split].paths.index(path)


@pytest.fixture()
def images(tmp_path) -> Path:
    root = render_digits(tmp_path / "img", per_class=4, classes=(0, 1, 2), splits=("train", "test"))
    _age(root)
    return root


def test_image_replaced_in_place_is_computed_again(tiny_vit, images, tmp_path):
    out = tmp_path / "f.h5"
    first = _extract(tiny_vit, images, out, tmp_path)
    assert first["rows_computed"] == 24 and first["rows_changed"] == 0
    with fc.open(out) as store:
        before = {s: store[s].cls[()].copy() for s in store.splits}
        paths = store["train"].paths
    # a re-exported image under the same name: the first "0" now holds the pixels of the first "2"
    target, source = images / paths[0], images / paths[-1]
    assert paths[0].startswith("train/0/") and paths[-1].startswith("train/2/")
    shutil.copyfile(source, target)
    again = _extract(tiny_vit, images, out, tmp_path)
    assert again["rows_changed"] == 1 and again["rows_computed"] == 1 and again["rows_done_before"] == 23
    assert "1 changed since extracted" in again["output"]
    with fc.open(out) as store:
        cls = store["train"].cls[()]
        # the row now holds the features of the image that is there (equal to its twin's row)
        np.testing.assert_allclose(cls[0], cls[-1], atol=1e-5)
        assert np.abs(cls[0] - before["train"][0]).max() > 1e-2
        np.testing.assert_array_equal(cls[1:], before["train"][1:])  # nothing else recomputed
        np.testing.assert_array_equal(store["test"].cls[()], before["test"])
    assert _extract(tiny_vit, images, out, tmp_path)["rows_computed"] == 0  # and then it is settled


def test_touched_or_copied_file_keeps_its_row(tiny_vit, images, tmp_path, monkeypatch):
    # the files were dated back just now, which sets their ctime to now: trust stats at once here
    monkeypatch.setattr("featcache.sources.RACY_NS", 0)
    out = tmp_path / "f.h5"
    _extract(tiny_vit, images, out, tmp_path)
    f = sorted((images / "test").rglob("*.png"))[0]
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)  # same bytes, new file and mtime (a copy without -p, a `touch`)
    _age(images, 60)
    again = _extract(tiny_vit, images, out, tmp_path)
    assert again["rows_changed"] == 0 and again["rows_computed"] == 0
    with fc.open(out) as store:
        row = _row(store, "test", f.relative_to(images).as_posix())
        stat = store["test"]._g["file_stat"][row]
    now = f.stat()
    assert tuple(int(v) for v in stat) == (now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino)  # refreshed


def test_recently_written_files_are_checked_by_content(tiny_vit, tmp_path):
    """A file written moments before it is read may change again within its mtime's resolution,
    so its stat is not trusted: the change is found by hash although size and mtime match."""
    root = render_digits(tmp_path / "img", per_class=3, classes=(0, 1), splits=("train",))
    for png in root.rglob("*.png"):  # as BMP: the size of the file does not depend on its pixels
        Image.open(png).save(png.with_suffix(".bmp"))
        png.unlink()
    out = tmp_path / "f.h5"
    _extract(tiny_vit, root, out, tmp_path)
    a = sorted(root.rglob("*.bmp"))[0]
    with fc.open(out) as store:
        assert (store["train"]._g["file_stat"][:, 1] == 0).all()  # just written: stat not trusted
    # same size, same mtime, other pixels: only a content check can tell
    stat = a.stat()
    pixels = np.asarray(Image.open(a)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(a)
    assert a.stat().st_size == stat.st_size
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = _extract(tiny_vit, root, out, tmp_path)
    assert again["rows_changed"] == 1 and again["rows_computed"] == 1


def test_unreadable_image_fixed_later_is_retried(tiny_vit, images, tmp_path):
    broken = images / "train" / "1" / "broken.png"
    good = sorted((images / "train" / "1").glob("*.png"))[0].read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    out = tmp_path / "f.h5"
    first = _extract(tiny_vit, images, out, tmp_path)
    assert first["rows_failed"] == 1
    assert _extract(tiny_vit, images, out, tmp_path)["rows_computed"] == 0  # unchanged: not retried
    broken.write_bytes(good)  # the file was re-exported
    again = _extract(tiny_vit, images, out, tmp_path)
    assert again["rows_changed"] == 1 and again["rows_computed"] == 1 and again["rows_failed"] == 0
    with fc.open(out) as store:
        assert store["train"].done.all() and not store["train"].errors


def test_update_computes_changed_images_again(tiny_vit, images, tmp_path):
    rows = sorted((p.relative_to(tmp_path).as_posix(), p.parent.name, p.parent.parent.name)
                  for p in images.rglob("*.png"))
    manifest = tmp_path / "data.csv"
    _manifest(manifest, rows[:-4])
    out = tmp_path / "f.h5"
    _extract(tiny_vit, manifest, out, tmp_path)
    _manifest(manifest, rows)  # 4 new images, and one kept name now holds another image
    changed = tmp_path / rows[0][0]
    shutil.copyfile(tmp_path / rows[1][0], changed)
    update = _extract(tiny_vit, manifest, out, tmp_path, "--update")
    assert update["updated"] and update["rows_changed"] == 1
    assert update["rows_computed"] == 5 and update["rows_reused"] == len(rows) - 4 - 1
    fresh = tmp_path / "fresh.h5"
    _extract(tiny_vit, manifest, fresh, tmp_path)
    with fc.open(out) as a, fc.open(fresh) as b:
        for s in a.splits:
            assert a[s].paths == b[s].paths and a[s].done.all()
            np.testing.assert_allclose(a[s].cls[()], b[s].cls[()], atol=1e-5)
            np.testing.assert_array_equal(a[s]._g["content"][()], b[s]._g["content"][()])


def test_hf_dataset_saved_anew_with_another_image_under_a_kept_name(tiny_vit, images, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted((images / "train").rglob("*.png"))

    def save(where: Path, swap: bool) -> Path:
        data = [f.read_bytes() for f in files]
        if swap:
            data[0] = files[-1].read_bytes()
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": d, "path": f"{f.parent.name}_{f.name}"} for d, f in zip(data, files)],
             "label": [int(f.parent.name) for f in files]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["0", "1", "2"])}))
        datasets.DatasetDict({"train": ds}).save_to_disk(str(where))
        return where

    out = tmp_path / "f.h5"
    _extract(tiny_vit, save(tmp_path / "v1", swap=False), out, tmp_path)
    again = _extract(tiny_vit, save(tmp_path / "v2", swap=True), out, tmp_path)
    assert again["rows_changed"] == 1 and again["rows_computed"] == 1
    with fc.open(out) as store:
        paths = store["train"].paths
        cls = store["train"].cls[()]
        first = paths.index(f"{files[0].parent.name}_{files[0].name}")
        last = paths.index(f"{files[-1].parent.name}_{files[-1].name}")
        np.testing.assert_allclose(cls[first], cls[last], atol=1e-5)


def test_file_without_recorded_contents_resumes_with_a_warning(tiny_vit, images, tmp_path, caplog):
    """Files made before featcache recorded contents lack the datasets: their rows are kept by path,
    and the run says that a change among them cannot be noticed."""
    out = tmp_path / "f.h5"
    _extract(tiny_vit, images, out, tmp_path)
    with h5py.File(out, "a") as f:
        for s in ("train", "test"):
            del f[s]["content"], f[s]["file_stat"]
    with caplog.at_level(logging.WARNING, logger="featcache"):
        again = _extract(tiny_vit, images, out, tmp_path)
    assert again["rows_computed"] == 0 and again["rows_unverified"] == 24
    assert "before featcache recorded each image's content" in caplog.text


def test_file_replaced_with_same_size_and_restored_mtime_is_noticed(tiny_vit, tmp_path, monkeypatch):
    """cp -p, rsync -t or tar -x of another version: same size, same mtime, other pixels. The file
    is a new one (inode, ctime), so it is hashed, and the change is found."""
    monkeypatch.setattr("featcache.sources.RACY_NS", 0)
    root = render_digits(tmp_path / "img", per_class=3, classes=(0, 1), splits=("train",))
    for png in root.rglob("*.png"):
        Image.open(png).save(png.with_suffix(".bmp"))
        png.unlink()
    out = tmp_path / "f.h5"
    _extract(tiny_vit, root, out, tmp_path)
    a = sorted(root.rglob("*.bmp"))[0]
    old = a.stat()
    pixels = 255 - np.asarray(Image.open(a))
    Image.fromarray(pixels).save(tmp_path / "new.bmp")
    os.utime(tmp_path / "new.bmp", ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(tmp_path / "new.bmp", a)
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again = _extract(tiny_vit, root, out, tmp_path)
    assert again["rows_changed"] == 1 and again["rows_computed"] == 1


def test_missing_file_listed_in_a_manifest_is_read_once_it_appears(tiny_vit, images, tmp_path, caplog):
    """A row that failed because its file was not there records that (not "no content"), is not
    counted as a row of an older file, and is computed when the file appears."""
    good = sorted(images.rglob("*.png"))[0]
    manifest = tmp_path / "m.csv"
    _manifest(manifest, [(good.relative_to(tmp_path).as_posix(), "0", "train"), ("late.png", "1", "train")])
    out = tmp_path / "f.h5"
    first = _extract(tiny_vit, manifest, out, tmp_path)
    assert first["rows_failed"] == 1
    with caplog.at_level(logging.WARNING, logger="featcache"):
        again = _extract(tiny_vit, manifest, out, tmp_path)
    assert again["rows_computed"] == 0 and again["rows_unverified"] == 0
    assert "before featcache recorded" not in caplog.text
    shutil.copyfile(good, tmp_path / "late.png")
    third = _extract(tiny_vit, manifest, out, tmp_path)
    assert third["rows_changed"] == 1 and third["rows_computed"] == 1 and third["rows_failed"] == 0


def test_a_file_gone_for_now_keeps_its_features(tiny_vit, images, tmp_path, caplog):
    """A manifest whose files are briefly missing (a share not mounted): the stored rows are kept
    with a warning, not thrown away and recomputed when the files are back."""
    rows = sorted((p.relative_to(tmp_path).as_posix(), p.parent.name, p.parent.parent.name)
                  for p in images.rglob("*.png"))
    manifest = _manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "f.h5"
    _extract(tiny_vit, manifest, out, tmp_path)
    with fc.open(out) as store:
        before = store["train"].cls[()].copy()
    moved = tmp_path / "away"
    shutil.move(images / "train", moved)
    with caplog.at_level(logging.WARNING, logger="featcache"):
        gone = _extract(tiny_vit, manifest, out, tmp_path)
    assert gone["rows_changed"] == 0 and gone["rows_computed"] == 0
    assert "have no file any more" in caplog.text
    shutil.move(moved, images / "train")
    back = _extract(tiny_vit, manifest, out, tmp_path)
    assert back["rows_computed"] == 0
    with fc.open(out) as store:
        np.testing.assert_array_equal(store["train"].cls[()], before)
        assert store["train"].done.all()


def test_update_of_a_file_with_the_first_two_column_stat(tiny_vit, images, tmp_path):
    """Files of the dataset's first version recorded (size, mtime) only: --update copies their rows
    (ctime and inode unknown: checked by hash once) and equals a fresh extraction."""
    rows = sorted((p.relative_to(tmp_path).as_posix(), p.parent.name, p.parent.parent.name)
                  for p in images.rglob("*.png"))
    manifest = _manifest(tmp_path / "m.csv", rows[:-2])
    out = tmp_path / "f.h5"
    _extract(tiny_vit, manifest, out, tmp_path)
    with h5py.File(out, "a") as f:
        for s in f:
            if s != "classes":
                two = f[s]["file_stat"][:, :2]
                del f[s]["file_stat"]
                f[s].create_dataset("file_stat", data=two)
    _manifest(manifest, rows)
    update = _extract(tiny_vit, manifest, out, tmp_path, "--update")
    assert update["rows_computed"] == 2 and update["rows_changed"] == 0
    fresh = tmp_path / "fresh.h5"
    _extract(tiny_vit, manifest, fresh, tmp_path)
    with fc.open(out) as a, fc.open(fresh) as b:
        for s in a.splits:
            np.testing.assert_allclose(a[s].cls[()], b[s].cls[()], atol=1e-5)
    assert _extract(tiny_vit, manifest, out, tmp_path)["rows_computed"] == 0


def test_a_run_killed_after_the_check_still_counts_the_changed_images(tiny_vit, images, tmp_path, monkeypatch,
                                                                       caplog):
    """The check makes changed rows pending and flushes; a run killed then (before they are computed)
    left them as plain unfinished rows: the next run said "resumed; N extracted, M already done" and
    rows_changed 0, never naming a change. They keep what was recorded of them, so the next run
    finds them changed again; the check's own warning names them at once."""
    from featcache import extraction

    out = tmp_path / "f.h5"
    _extract(tiny_vit, images, out, tmp_path)
    with fc.open(out) as store:
        paths = store["train"].paths
    for p in paths[:3]:  # three images re-exported under their names: pixels of the last one
        shutil.copyfile(images / paths[-1], images / p)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill after the check: the pending rows are on disk, nothing computed

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="featcache"):
        m.setattr(extraction, "_extract_items", killed)
        cut = CliRunner().invoke(cli, ["extract", "-m", str(tiny_vit), "-d", str(images), "-o", str(out), "--dtype",
                                       "float32", "--workers", "0", "--batch-size", "8"])
    assert cut.exit_code != 0
    assert "3 image(s) of split train changed since they were extracted" in caplog.text
    caplog.clear()
    with h5py.File(out, "r") as f:
        assert f["train"]["done"][()].sum() == len(paths) - 3
    with caplog.at_level(logging.WARNING, logger="featcache"):
        again = _extract(tiny_vit, images, out, tmp_path)
    assert again["rows_changed"] == 3 and again["rows_computed"] == 3 and again["rows_done_before"] == 24 - 3
    assert "3 changed since extracted" in again["output"]
    assert "3 of them found so by an interrupted run" in caplog.text
    with fc.open(out) as store:
        cls = store["train"].cls[()]
        for r in range(3):
            np.testing.assert_allclose(cls[r], cls[-1], atol=1e-5)
    settled = _extract(tiny_vit, images, out, tmp_path)
    assert settled["rows_computed"] == 0 and settled["rows_changed"] == 0


def test_retry_errors_is_no_interrupted_run(tiny_vit, images, tmp_path, caplog):
    """--retry-errors clears the failed rows' errors before the check: a row recorded unreadable
    was then taken for one a killed run had found changed ("1 of them found so by an interrupted
    run", rows_changed 1) although no run was interrupted."""
    good = sorted(images.rglob("*.png"))[0]
    manifest = tmp_path / "m.csv"
    _manifest(manifest, [(good.relative_to(tmp_path).as_posix(), "0", "train"), ("late.png", "1", "train")])
    out = tmp_path / "f.h5"
    assert _extract(tiny_vit, manifest, out, tmp_path)["rows_failed"] == 1
    shutil.copyfile(good, tmp_path / "late.png")
    with caplog.at_level(logging.WARNING, logger="featcache"):
        retried = _extract(tiny_vit, manifest, out, tmp_path, "--retry-errors")
    assert retried["rows_computed"] == 1 and retried["rows_failed"] == 0 and retried["rows_changed"] == 0
    assert "interrupted run" not in caplog.text
