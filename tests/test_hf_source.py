"""Hugging Face `datasets` directories as input, thingsvision .h5 import, and SplitView.table().

The datasets are built in the test from the same real digit PNGs as the folder tests, saved with
save_to_disk, and extracted through the CLI; their features must equal those of the folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

import featcache as fc
from featcache.sources import ImageDecodeError, discover, load_image
from featcache_cli.main import cli

datasets = pytest.importorskip("datasets")

NAMES = ["zero", "one", "two"]  # ClassLabel names differ from the folder names on purpose


def _folder_rows(digits_dir: Path, split: str) -> list[tuple[Path, int]]:
    files = sorted((digits_dir / split).rglob("*.png"))
    return [(f, int(f.parent.name)) for f in files]


def _image_dataset(rows: list[tuple[Path, int]], keep_path: bool = True, **extra_columns) -> "datasets.Dataset":
    """An Image + ClassLabel dataset holding the files' encoded bytes (in reversed folder order)."""
    rows = rows[::-1]
    data = {"image": [{"bytes": f.read_bytes(), "path": f.name if keep_path else None} for f, _ in rows],
            "label": [y for _, y in rows]}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    for name, (feature, values) in extra_columns.items():
        data[name] = values
        features[name] = feature
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


@pytest.fixture()
def hf_dir(tmp_path, digits_dir) -> Path:
    """A DatasetDict (train, test) of the digit PNGs, written with save_to_disk."""
    dd = datasets.DatasetDict({s: _image_dataset(_folder_rows(digits_dir, s)) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf"


def _extract(model: Path, data: Path, out: Path, *extra: str) -> "CliRunner.Result":
    return CliRunner().invoke(cli, ["extract", "--model", str(model), "--data", str(data), "--out", str(out),
                                    "--dtype", "float32", "--workers", "0", "--quiet", *extra])


def test_features_equal_those_of_the_folder_and_resume(tiny_vit, digits_dir, hf_dir, tmp_path):
    folder = _extract(tiny_vit, digits_dir, tmp_path / "folder.h5")
    assert folder.exit_code == 0, folder.output
    first = _extract(tiny_vit, hf_dir, tmp_path / "hf.h5", "--workers", "1")  # a worker process decodes
    assert first.exit_code == 0, first.output
    assert "60 images extracted, 0 skipped" in first.output
    with fc.open(tmp_path / "folder.h5") as ref, fc.open(tmp_path / "hf.h5") as got:
        assert got.classes == NAMES and sorted(got.splits) == ["test", "train"]  # HDF5 lists groups by name
        assert got.config["data_root"] == str(hf_dir.resolve())
        for split in ("train", "test"):
            r, g = ref[split], got[split]
            assert g.done.all() and g.cls.dtype == np.float32
            # rows keep the dataset's order (reversed folder order) and the kept file names as ids
            assert g.paths == [Path(p).name for p in r.paths][::-1]
            np.testing.assert_allclose(g.cls[()], r.cls[()][::-1], atol=1e-6, rtol=0)
            np.testing.assert_allclose(g.pooled[()], r.pooled[()][::-1], atol=1e-6, rtol=0)
            np.testing.assert_array_equal(g.labels, r.labels[::-1])
    again = _extract(tiny_vit, hf_dir, tmp_path / "hf.h5")
    assert again.exit_code == 0, again.output
    assert "resumed; 0 images extracted" in again.output and "60 already done" in again.output


def test_plain_dataset_string_labels_and_index_ids(tiny_vit, digits_dir, tmp_path):
    rows = _folder_rows(digits_dir, "train")[::2]  # 15 rows, 5 per class
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": f.read_bytes(), "path": None} for f, _ in rows],
         "target": [["cat", "dog", "emu"][y] if i != 3 else None for i, (_, y) in enumerate(rows)]},
        features=datasets.Features({"img": datasets.Image(), "target": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "plain"))
    source = discover(tmp_path / "plain")
    assert source.kind == "hf" and list(source.splits) == ["all"]  # like a root/<class>/x folder
    rows_all = source.splits["all"]
    assert rows_all.paths[:2] == ["all/00000000", "all/00000001"]
    assert source.classes == ["cat", "dog", "emu"]
    assert rows_all.labels.tolist() == [y if i != 3 else -1 for i, (_, y) in enumerate(rows)]
    result = _extract(tiny_vit, tmp_path / "plain", tmp_path / "p.h5")
    assert result.exit_code == 0, result.output
    with fc.open(tmp_path / "p.h5") as store:
        assert store["all"].done.sum() == 15 and store.classes == ["cat", "dog", "emu"]


def test_column_overrides_and_ambiguous_image_columns(tiny_vit, digits_dir, tmp_path):
    rows = _folder_rows(digits_dir, "test")[::3]  # 10 rows of every class
    coarse = ["small" if y == 0 else "big" for _, y in rows]
    ds = _image_dataset(rows, photo=(datasets.Image(), [{"bytes": f.read_bytes(), "path": None} for f, _ in rows[::-1]]),
                        coarse=(datasets.Value("string"), coarse[::-1]))
    ds.save_to_disk(str(tmp_path / "two"))
    refused = _extract(tiny_vit, tmp_path / "two", tmp_path / "x.h5")
    assert refused.exit_code != 0
    assert "several image columns (image, photo)" in refused.output and "--image-column" in refused.output
    ok = _extract(tiny_vit, tmp_path / "two", tmp_path / "x.h5", "--image-column", "photo", "--label-column", "coarse")
    assert ok.exit_code == 0, ok.output
    with fc.open(tmp_path / "x.h5") as store:
        assert store.classes == ["big", "small"]
        assert store["all"].paths[0] == "all/00000000"  # the photo column kept no paths
        assert store["all"].labels.tolist() == [1 if c == "small" else 0 for c in coarse[::-1]]
    wrong = _extract(tiny_vit, tmp_path / "two", tmp_path / "y.h5", "--image-column", "coarse")
    assert wrong.exit_code != 0 and "expected a datasets.Image column" in wrong.output
    missing = _extract(tiny_vit, tmp_path / "two", tmp_path / "y.h5", "--image-column", "photo",
                       "--label-column", "nope")
    assert missing.exit_code != 0 and "'nope' is not a column" in missing.output
    folder = _extract(tiny_vit, digits_dir, tmp_path / "z.h5", "--image-column", "image")
    assert folder.exit_code != 0 and "applies to a Hugging Face datasets directory" in folder.output


def test_decoding_rows_matches_decoding_files(tmp_path):
    """16-bit, RGBA, palette and EXIF-rotated images decode identically from a dataset and from files."""
    rng = np.random.default_rng(0)
    files = []
    img16 = PILImage.fromarray((rng.integers(0, 65535, (9, 7))).astype(np.uint16))
    img16.save(tmp_path / "a16.png"); files.append(tmp_path / "a16.png")
    PILImage.fromarray(rng.integers(0, 255, (6, 5, 4), dtype=np.uint8), "RGBA").save(tmp_path / "b.png")
    files.append(tmp_path / "b.png")
    PILImage.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).convert("P").save(tmp_path / "c.png")
    files.append(tmp_path / "c.png")
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90
    PILImage.fromarray(rng.integers(0, 255, (4, 8, 3), dtype=np.uint8)).save(tmp_path / "d.jpg", exif=exif)
    files.append(tmp_path / "d.jpg")
    (tmp_path / "e.png").write_bytes(b"not an image")
    files.append(tmp_path / "e.png")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = discover(tmp_path / "ds").splits["all"]
    assert rows.paths == [f.name for f in files] and rows.labels.tolist() == [-1] * 5
    for ref, f in zip(rows.files[:4], files):
        np.testing.assert_array_equal(np.asarray(load_image(Path(ref))), np.asarray(load_image(f)))
    assert np.asarray(load_image(rows.files[3])).shape == (8, 4, 3)  # EXIF applied
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(rows.files[4])


def test_row_references_round_trip():
    from featcache.hf_source import make_ref, parse_ref

    ref = make_ref(Path("/data/my ds::v2"), "train.extra", 12, "image/x")
    assert str(Path(str(ref))) == str(ref)
    parsed = parse_ref(ref)
    assert (parsed.root, parsed.split, parsed.index, parsed.column) == ("/data/my ds::v2", "train.extra", 12, "image/x")
    assert parse_ref(Path("/data/images/hf:cat.png")) is None and parse_ref("relative/x.png") is None


def test_missing_datasets_says_how_to_install(hf_dir, tiny_vit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'featcache\[hf\]'"):
        discover(hf_dir)
    result = _extract(tiny_vit, hf_dir, tmp_path / "x.h5")
    assert result.exit_code != 0 and "pip install 'featcache[hf]'" in result.output


def test_import_thingsvision_h5(tmp_path, digits_arrays, digits_feature_file):
    x, y = digits_arrays["train"]
    with h5py.File(tmp_path / "features.hdf5", "w") as f:  # thingsvision's save_features(..., "hdf5")
        f.create_dataset("features", data=x)
        f.create_dataset("targets", data=y)
    with h5py.File(tmp_path / "conv.h5", "w") as f:
        f.create_dataset("features", data=digits_arrays["test"][0].reshape(-1, 4, 4, 4))
    out = tmp_path / "imported.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["import", "--out", str(out), "--split", f"train={tmp_path / 'features.hdf5'}",
                                 "--split", f"test={tmp_path / 'conv.h5'}", "--model", "thingsvision-vit"])
    assert result.exit_code == 0, result.output
    with fc.open(out) as store:
        np.testing.assert_array_equal(store["train"].features("cls"), x)
        np.testing.assert_array_equal(store["train"].labels, y)
        np.testing.assert_array_equal(store["test"].features("cls"), digits_arrays["test"][0])  # flattened
        assert (store["test"].labels == -1).all() and store.classes == [str(i) for i in range(10)]
    refused = runner.invoke(cli, ["import", "--out", str(tmp_path / "again.h5"), "--split",
                                  f"train={digits_feature_file}"])
    assert refused.exit_code != 0 and "already a featcache feature file" in refused.output
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    other = runner.invoke(cli, ["import", "--out", str(tmp_path / "o.h5"), "--split", f"train={tmp_path / 'other.h5'}"])
    assert other.exit_code != 0 and "has no features" in other.output and "weights" in other.output


def test_table(digits_feature_file, tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    with fc.open(digits_feature_file) as store:
        s = store["val"]
        df = s.table()
        assert isinstance(df, pd.DataFrame) and len(df) == s.n
        assert list(df.columns) == ["path", "label", "class_name", "group", "done", "error"]
        assert df["label"].tolist() == s.labels.tolist()
        assert df["class_name"].tolist() == [str(v) for v in s.labels]
        assert df["done"].all() and (df["error"] == "").all() and df["group"].isna().all()
        monkeypatch.setitem(sys.modules, "pandas", None)
        with pytest.raises(ImportError, match="pip install pandas"):
            s.table()
    monkeypatch.undo()
    fc.store.write_arrays(tmp_path / "ml.h5", {"all": {
        "cls": np.eye(3, dtype=np.float32), "labels": np.array([[1, 0], [1, 1], [0, 0]], dtype=np.uint8),
        "groups": ["p1", "p1", "p2"]}}, ["effusion", "nodule"], {"model": "m"})
    with fc.open(tmp_path / "ml.h5") as store:
        df = store["all"].table()
        assert df["label"].tolist() == [[0], [0, 1], []]
        assert df["class_name"].tolist() == ["effusion", "effusion|nodule", ""]
        assert df["group"].tolist() == ["p1", "p1", "p2"]


def test_multilabel_column_and_split_without_labels(digits_dir, tmp_path):
    """A list-of-ClassLabel column is multi-label; a split lacking it, or a row whose list is None,
    is refused: it would be stored as 'no finding' (it was, and scored as true negatives)."""
    rows = _folder_rows(digits_dir, "train")[:4]
    seq = getattr(datasets, "List", datasets.Sequence)
    images = [{"bytes": f.read_bytes(), "path": None} for f, _ in rows]
    labelled = datasets.Dataset.from_dict(
        {"image": images, "findings": [[0], [0, 1], [], [1]]},
        features=datasets.Features({"image": datasets.Image(),
                                    "findings": seq(datasets.ClassLabel(names=["effusion", "nodule"]))}))
    bare = datasets.Dataset.from_dict({"image": images[:2]}, features=datasets.Features({"image": datasets.Image()}))
    datasets.DatasetDict({"train": labelled, "test": bare}).save_to_disk(str(tmp_path / "ml"))
    with pytest.raises(ValueError, match="split\\(s\\) test of .* have no 'findings' column.*'no finding'"):
        discover(tmp_path / "ml")
    labelled.save_to_disk(str(tmp_path / "ml1"))
    source = discover(tmp_path / "ml1")  # the one (list of) ClassLabel column is found by itself
    assert source.multilabel and source.classes == ["effusion", "nodule"]
    assert source.splits["all"].labels.tolist() == [[1, 0], [1, 1], [0, 0], [0, 1]]
    assert source.splits["all"].paths == ["all/00000000", "all/00000001", "all/00000002", "all/00000003"]
    holes = datasets.Dataset.from_dict(
        {"image": images[:2], "findings": [[0], None]},
        features=datasets.Features({"image": datasets.Image(),
                                    "findings": seq(datasets.ClassLabel(names=["effusion", "nodule"]))}))
    holes.save_to_disk(str(tmp_path / "holes"))
    with pytest.raises(ValueError, match="1 row\\(s\\) \\(first: row 1\\) have no 'findings' list"):
        discover(tmp_path / "holes")


def test_update_of_a_grown_dataset_reuses_stored_rows(tiny_vit, digits_dir, tmp_path):
    """Rows keep their ids (kept file names), so `extract --update` on a dataset saved again with
    more rows reuses the stored ones and computes only the new, equal to a fresh extraction."""
    rows = _folder_rows(digits_dir, "train")
    datasets.DatasetDict({"train": _image_dataset(rows[:20])}).save_to_disk(str(tmp_path / "v1"))
    out = tmp_path / "grown.h5"
    assert _extract(tiny_vit, tmp_path / "v1", out).exit_code == 0
    # next month the dataset has 10 more images (saved anew; the data root is provenance, not identity)
    datasets.DatasetDict({"train": _image_dataset(rows)}).save_to_disk(str(tmp_path / "data"))
    res = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"), "--out",
                                   str(out), "--dtype", "float32", "--workers", "0", "--update",
                                   "--json", str(tmp_path / "u.json")])
    assert res.exit_code == 0, res.output
    import json

    summary = json.loads((tmp_path / "u.json").read_text())
    assert summary["rows_reused"] == 20 and summary["rows_computed"] == 10 and summary["rows_dropped"] == 0
    fresh = tmp_path / "fresh.h5"
    assert _extract(tiny_vit, tmp_path / "data", fresh).exit_code == 0
    with fc.open(out) as a, fc.open(fresh) as b:
        assert a["train"].paths == b["train"].paths
        np.testing.assert_allclose(a["train"].cls[()], b["train"].cls[()], atol=1e-6)


def _bytes_of(rows) -> list[dict]:
    return [{"bytes": f.read_bytes(), "path": None} for f, _ in rows]


def _dataset(columns: dict, features: dict) -> "datasets.Dataset":
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_labels_and_groups_read_across_splits(digits_dir, tmp_path):
    """Every split's labels are read in its own terms: a first split without labels, ClassLabel names
    in another order, string labels beside a ClassLabel; a `group` column is the patients by default,
    with ids spelt once (7.0 -> 7, NaN -> a patient of its own)."""
    rows = _folder_rows(digits_dir, "train")[:4]
    image = datasets.Image()
    unlabelled = _dataset({"image": _bytes_of(rows[:2])}, {"image": image})
    train = _dataset({"image": _bytes_of(rows), "label": [1, 0, 1, 0], "group": [7.0, 7.0, float("nan"), 8.0]},
                     {"image": image, "label": datasets.ClassLabel(names=["x", "y"]), "group": datasets.Value("float64")})
    reordered = _dataset({"image": _bytes_of(rows[:2]), "label": [0, 1]},     # y, x
                         {"image": image, "label": datasets.ClassLabel(names=["y", "x"])})
    named = _dataset({"image": _bytes_of(rows[:2]), "label": ["y", "x"]}, {"image": image, "label": datasets.Value("string")})
    datasets.DatasetDict({"extra": unlabelled, "train": train, "val": reordered, "test": named}).save_to_disk(
        str(tmp_path / "dd"))
    source = discover(tmp_path / "dd")
    assert source.classes == ["x", "y"]
    labels = {name: rows.labels.tolist() for name, rows in source.splits.items()}
    assert labels == {"extra": [-1, -1], "train": [1, 0, 1, 0], "val": [1, 0], "test": [1, 0]}
    assert source.splits["train"].groups == ["7", "7", "", "8"] and source.splits["val"].groups is None


def test_label_columns_of_other_types_are_read_or_refused(digits_dir, tmp_path):
    rows = _folder_rows(digits_dir, "train")[:4]
    image = datasets.Image()
    seq = getattr(datasets, "List", datasets.Sequence)
    cases = {
        "float": ({"label": [0.0, 2.0, float("nan"), 1.0]}, {"label": datasets.Value("float32")}),
        "list_int": ({"labels": [[0], [1, 2], [], [2]]}, {"labels": seq(datasets.Value("int64"))}),
        "ambiguous": ({"label": [0, 1, 2, 1], "domain": [0, 0, 1, 1]},
                      {"label": datasets.Value("int64"), "domain": datasets.ClassLabel(names=["web", "lab"])}),
        "fraction": ({"label": [0.5, 1.0, 0.0, 1.0]}, {"label": datasets.Value("float32")}),
        "with_boxes": ({"label": [0, 1, 1, 0], "targets": [[[0.5, 1.5]]] * 4},
                       {"label": datasets.ClassLabel(names=["a", "b"]), "targets": seq(seq(datasets.Value("float32")))}),
        "int_vs_names": None,
    }
    for name, case in cases.items():
        if case is not None:
            columns, features = case
            _dataset({"image": _bytes_of(rows), **columns}, {"image": image, **features}).save_to_disk(str(tmp_path / name))
    ints = _dataset({"image": _bytes_of(rows[:2]), "label": [0, 1]}, {"image": image, "label": datasets.Value("int64")})
    names = _dataset({"image": _bytes_of(rows[:2]), "label": [0, 1]},
                     {"image": image, "label": datasets.ClassLabel(names=["b", "a"])})
    datasets.DatasetDict({"train": names, "test": ints}).save_to_disk(str(tmp_path / "int_vs_names"))
    floats = discover(tmp_path / "float")
    assert floats.classes == ["0", "1", "2"] and floats.splits["all"].labels.tolist() == [0, 2, -1, 1]
    multi = discover(tmp_path / "list_int")
    assert multi.multilabel and multi.classes == ["0", "1", "2"]
    assert multi.splits["all"].labels.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="ClassLabel column 'domain' and a label column 'label'.*--label-column"):
        discover(tmp_path / "ambiguous")
    assert discover(tmp_path / "ambiguous", label_column="domain").classes == ["web", "lab"]
    assert discover(tmp_path / "with_boxes").splits["all"].labels.tolist() == [0, 1, 1, 0]  # boxes beside it
    masks = _dataset({"image": _bytes_of(rows), "label": _bytes_of(rows)}, {"image": image, "label": image})
    masks.save_to_disk(str(tmp_path / "segmentation"))  # a mask named "label": not classes, not refused
    seg = discover(tmp_path / "segmentation", image_column="image")
    assert seg.classes == [] and seg.splits["all"].labels.tolist() == [-1, -1, -1, -1]
    fraction = discover(tmp_path / "fraction")  # a float target (age, a score): unlabelled, with a warning
    assert fraction.classes == [] and fraction.splits["all"].labels.tolist() == [-1, -1, -1, -1]
    with pytest.raises(ValueError, match="holds 0.5, which is not a class label"):
        discover(tmp_path / "fraction", label_column="label")  # asked for by name: refused
    with pytest.raises(ValueError, match="names classes differently in different splits"):
        discover(tmp_path / "int_vs_names")


def test_extract_keeps_the_group_column_of_a_dataset(tiny_vit, digits_dir, tmp_path):
    rows = _folder_rows(digits_dir, "train")[:6]
    ds = _image_dataset(rows, group=(datasets.Value("string"), ["p1", "p1", "p2", "p2", "p3", "p3"]))
    ds.save_to_disk(str(tmp_path / "g"))
    r = _extract(tiny_vit, tmp_path / "g", tmp_path / "g.h5")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "g.h5") as store:
        assert list(store["all"].groups) == ["p1", "p1", "p2", "p2", "p3", "p3"]
    missing = _extract(tiny_vit, tmp_path / "g", tmp_path / "h.h5", "--group-column", "patient")
    assert missing.exit_code != 0 and "--group-column 'patient' is not a column" in missing.output


def test_a_classlabel_group_column_is_patients_not_classes(digits_dir, tmp_path):
    """Encoded patient ids (a ClassLabel `group`) were taken as the label column, and stored as
    their codes: patient 0 of one split was patient 0 of another."""
    rows = _folder_rows(digits_dir, "train")[:4]
    image = datasets.Image()
    a = _dataset({"image": _bytes_of(rows[:2]), "group": [0, 1]},
                 {"image": image, "group": datasets.ClassLabel(names=["p7", "p8"])})
    b = _dataset({"image": _bytes_of(rows[2:]), "group": [0, 0]},
                 {"image": image, "group": datasets.ClassLabel(names=["p9"])})
    datasets.DatasetDict({"train": a, "test": b}).save_to_disk(str(tmp_path / "g"))
    source = discover(tmp_path / "g")
    assert source.classes == [] and source.splits["train"].labels.tolist() == [-1, -1]
    assert source.splits["train"].groups == ["p7", "p8"] and source.splits["test"].groups == ["p9", "p9"]


def test_a_rerun_whose_only_change_is_the_groups_says_so(tiny_vit, digits_dir, tmp_path):
    """A file made when the dataset's groups were not read (an earlier featcache ignored a 'group'
    column) was refused as 'the images or labels changed'."""
    rows = _folder_rows(digits_dir, "train")[:6]
    _image_dataset(rows).save_to_disk(str(tmp_path / "v1"))
    assert _extract(tiny_vit, tmp_path / "v1", tmp_path / "f.h5").exit_code == 0
    _image_dataset(rows, group=(datasets.Value("string"), ["p1", "p1", "p2", "p2", "p3", "p3"])).save_to_disk(
        str(tmp_path / "v2"))
    import shutil

    shutil.rmtree(tmp_path / "v1")
    shutil.move(str(tmp_path / "v2"), str(tmp_path / "v1"))  # the same directory, saved again with groups
    r = _extract(tiny_vit, tmp_path / "v1", tmp_path / "f.h5")
    assert r.exit_code != 0 and "group (patient) ids of split 'all' differ" in r.output, r.output
    assert "--update to record the groups" in r.output
    r = _extract(tiny_vit, tmp_path / "v1", tmp_path / "f.h5", "--update")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "f.h5") as store:
        assert list(store["all"].groups) == ["p1", "p1", "p2", "p2", "p3", "p3"]


def test_an_unreadable_label_never_hands_the_task_to_another_column(digits_dir, tmp_path):
    """A mask named 'label' beside a ClassLabel 'sex' extracted sex as the task (classes F/M) with a
    warning about 'label' only; a label readable in one split and boxes in another was a traceback."""
    rows = _folder_rows(digits_dir, "train")[:4]
    image = datasets.Image()
    seq = getattr(datasets, "List", datasets.Sequence)
    _dataset({"image": _bytes_of(rows), "label": _bytes_of(rows), "sex": [0, 1, 1, 0]},
             {"image": image, "label": image, "sex": datasets.ClassLabel(names=["F", "M"])}).save_to_disk(
        str(tmp_path / "seg"))
    with pytest.raises(ValueError, match="'label' .* holds no classes, and 'sex' is a ClassLabel"):
        discover(tmp_path / "seg", image_column="image")
    assert discover(tmp_path / "seg", image_column="image", label_column="sex").classes == ["F", "M"]
    train = _dataset({"image": _bytes_of(rows[:2]), "label": [0, 1]}, {"image": image, "label": datasets.Value("int64")})
    test = _dataset({"image": _bytes_of(rows[2:]), "label": [[[0.5]], [[1.5]]]},
                    {"image": image, "label": seq(seq(datasets.Value("float32")))})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="is a class label in some splits and not in others"):
        discover(tmp_path / "mixed")


def test_dicom_bytes_inside_a_dataset_are_skipped_with_their_reason(tiny_vit, digits_dir, tmp_path):
    """README: DICOM bytes stored in a dataset are not decoded; the row is skipped, the others kept."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rows = _folder_rows(digits_dir, "train")[:4]
    ds = _image_dataset(rows)
    image = [{"bytes": dicom, "path": "ct.dcm"}] + [{"bytes": f.read_bytes(), "path": f.name} for f, _ in rows[:3]]
    ds = datasets.Dataset.from_dict({"image": image, "label": [0, 1, 2, 0]}, features=ds.features)
    ds.save_to_disk(str(tmp_path / "hf"))
    r = _extract(tiny_vit, tmp_path / "hf", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    assert "3 images extracted, 1 skipped" in r.output and "DICOM bytes inside a dataset" in r.output
    with fc.open(tmp_path / "f.h5") as f:
        assert f["all"].done.tolist() == [False, True, True, True]


def test_minus_one_and_nan_names_are_unlabelled_in_every_source(digits_dir, tmp_path, caplog):
    """A text label "-1" (or "nan") marks a row unlabelled in a manifest, a Hugging Face string
    column and an import alike, as the index -1 does: it used to be a class "-1" in the first two
    (a binary task became three classes, "-1" sorting first as class 0) and unlabelled in the third."""
    from featcache.importing import import_features
    from tests.conftest import write_manifest

    rows = _folder_rows(digits_dir, "train")[:6]
    text = ["cat", "-1", "dog", "nan", " cat ", ""]
    expected = [0, -1, 1, -1, 0, -1]
    manifest = write_manifest(tmp_path / "m.csv", [(str(f), t, "train") for (f, _), t in zip(rows, text)])
    with caplog.at_level("WARNING"):
        csv_source = discover(manifest)
    assert csv_source.classes == ["cat", "dog"]
    assert csv_source.splits["train"].labels.tolist() == expected
    assert "2 row(s) labelled '-1' / 'nan' are read as unlabelled" in caplog.text

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": f.name} for f, _ in rows], "label": text},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        hf_source = discover(tmp_path / "hf")
    assert hf_source.classes == ["cat", "dog"]
    assert hf_source.splits["train"].labels.tolist() == expected
    assert "2 row(s) labelled '-1' / 'nan' are read as unlabelled" in caplog.text

    np.save(tmp_path / "x.npy", np.zeros((6, 4), np.float32))
    np.savez(tmp_path / "y.npz", labels=np.array(text))
    with import_features(tmp_path / "i.h5", {"train": tmp_path / "x.npy"}, labels={"train": tmp_path / "y.npz"}) as s:
        assert s.classes == ["cat", "dog"] and s["train"].labels.tolist() == expected
