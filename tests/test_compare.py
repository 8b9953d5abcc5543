"""featcache compare (paired bootstrap over backbones) and few-shot curves, end to end on real digits."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.comparing import compare
from featcache.evaluation import few_shot, few_shot_rng, few_shot_rows
from featcache.knn import knn_eval
from featcache.metrics import resample_indices
from featcache.store import FeatureStore, write_arrays
from featcache_cli.main import cli

BOOT = 200


def _write(path: Path, arrays: dict, noise: float = 0.0, *, groups: bool = True, moved_row: int | None = None,
           binary: bool = False) -> Path:
    """One backbone's file over the digits rows: the digits vectors, optionally heavily noised."""
    rng = np.random.default_rng(1)
    splits = {}
    for name, (x, y) in arrays.items():
        feats = x + rng.normal(0, noise, x.shape).astype(np.float32) if noise else x
        paths = [f"{name}/{y[i]}/{i:05d}.png" for i in range(len(y))]
        if moved_row is not None and name == "test":
            paths[moved_row] = "test/elsewhere.png"
        labels = (y == 3).astype(np.int64) if binary else y
        split = {"cls": feats, "labels": labels, "paths": paths}
        if groups:
            split["groups"] = [f"{name}-p{i // 3}" for i in range(len(y))]  # three images per patient
        splits[name] = split
    classes = ["other", "three"] if binary else [str(c) for c in range(10)]
    write_arrays(path, splits, classes, {"model": path.stem, "tokens": "none", "dtype": "float32"}).close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_arrays) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {"good": _write(root / "good.h5", digits_arrays), "noisy": _write(root / "noisy.h5", digits_arrays, 1.5),
            "moved": _write(root / "moved.h5", digits_arrays, moved_row=7)}


@pytest.fixture(scope="module")
def result(files):
    return compare([files["noisy"], files["good"]], bootstrap=BOOT, seed=0)


def test_better_backbone_ranks_first_with_paired_ci_excluding_zero(result):
    assert result.ranking == ["good.h5", "noisy.h5"]
    for method in ("knn", "probe"):
        pair = next(p for p in result.pairs if p["method"] == method and p["metric"] == "top1")
        assert (pair["a"], pair["b"]) == ("good.h5", "noisy.h5")
        assert pair["diff"] > 0.3 and pair["ci"][0] > 0, pair
    assert result.config["grouped"] is True


def test_paired_bootstrap_equals_plain_numpy(result):
    """Same resampled rows (whole patients) for both files: CIs recomputed with numpy alone; each
    file's top-1 interval is the Wilson one train and probe give (patients by design effect), its
    balanced accuracy's the resamples' percentile interval."""
    from tests.conftest import wilson_by_patient

    y = result.test_y
    groups = [f"test-p{i // 3}" for i in range(len(y))]
    idx = resample_indices(len(y), BOOT, groups, 0)
    top1 = {}
    for f in ("good.h5", "noisy.h5"):
        pred = result.proba[(f, "probe")].argmax(axis=1)
        top1[f] = np.array([np.mean(pred[ix] == y[ix]) for ix in idx])
        row = next(r for r in result.rows if r["file"] == f and r["method"] == "probe" and r["metric"] == "top1")
        assert row["value"] == pytest.approx(np.mean(pred == y))
        assert row["ci"] == pytest.approx(wilson_by_patient((pred == y).astype(float), groups), abs=1e-12)
        assert row["interval"] == "wilson"
        recalls = [[np.mean(pred[ix][y[ix] == c] == c) for c in np.unique(y)] for ix in idx]
        ok = [np.mean(r) for r, ix in zip(recalls, idx) if len(np.unique(y[ix])) == len(np.unique(y))]
        ba = next(r for r in result.rows if r["file"] == f and r["method"] == "probe" and r["metric"] == "balanced_accuracy")
        assert ba["ci"] == pytest.approx([np.quantile(ok, 0.025), np.quantile(ok, 0.975)]) and ba["interval"] == "bootstrap"
    assert "Wilson score for each file's top1 (patients by design effect)" in result.intervals
    diff = top1["good.h5"] - top1["noisy.h5"]
    pair = next(p for p in result.pairs if p["method"] == "probe" and p["metric"] == "top1")
    assert pair["ci"] == pytest.approx([np.quantile(diff, 0.025), np.quantile(diff, 0.975)])


def test_mismatched_files_refused_in_one_line(files):
    runner = CliRunner()
    res = runner.invoke(cli, ["compare", str(files["good"]), str(files["moved"]), "--bootstrap", "10"])
    assert res.exit_code == 1
    message = res.output.strip()
    assert len(message.splitlines()) == 1
    assert "moved.h5" in message and "'test'" in message and "row 7" in message and "elsewhere.png" in message
    one = runner.invoke(cli, ["compare", str(files["good"])])
    assert one.exit_code == 2 and "2 to 20" in one.output


def test_cli_json_layout_and_run_dir(files, tmp_path):
    out, js = tmp_path / "run", tmp_path / "cmp.json"
    res = CliRunner().invoke(cli, ["compare", str(files["noisy"]), str(files["good"]), "--bootstrap", "50",
                                   "--json", str(js), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "good.h5" in res.output and "excludes 0" in res.output
    data = json.loads(js.read_text())
    assert data["ranking"] == ["good.h5", "noisy.h5"]
    assert set(data["rows"][0]) >= {"file", "method", "metric", "value", "ci"}
    assert {(r["method"], r["metric"]) for r in data["rows"]} == {(m, k) for m in ("knn", "probe")
                                                                  for k in ("top1", "balanced_accuracy")}
    pair = data["pairs"][0]
    assert set(pair) == {"a", "b", "method", "metric", "diff", "ci"} and len(pair["ci"]) == 2
    assert data["config"]["bootstrap"] == 50 and data["positive_class"] is None
    assert (out / "metrics.json").is_file() and (out / "figures" / "compare_top1.png").is_file()
    from featcache.report import write_report

    report = write_report([out], tmp_path / "report")
    assert "paired differences" in report["md"].read_text()


def test_binary_task_reports_auroc_and_sensitivity_of_named_positive(tmp_path, digits_arrays):
    a = _write(tmp_path / "a.h5", digits_arrays, binary=True, groups=False)
    b = _write(tmp_path / "b.h5", digits_arrays, 1.5, binary=True, groups=False)
    res = compare([a, b], bootstrap=50, positive_class="three")
    assert res.positive_class == "three" and res.primary == "auroc"
    metrics = {r["metric"] for r in res.rows}
    assert {"auroc", "sensitivity", "specificity", "top1"} <= metrics
    row = next(r for r in res.rows if r["file"] == "a.h5" and r["method"] == "probe" and r["metric"] == "sensitivity")
    p, y = res.proba[("a.h5", "probe")], res.test_y
    assert row["value"] == pytest.approx(np.mean(p[y == 1, 1] >= 0.5))
    assert res.ranking[0] == "a.h5"


def test_few_shot_knn_matches_plain_recomputation(digits_feature_file):
    with FeatureStore(digits_feature_file) as store:
        res = few_shot(store, method="knn", shots=(1, 2, 5), tries=3, k=20, seed=0)
        train_x, train_y, _ = store["train"].arrays("cls")
        test_x, test_y, _ = store["test"].arrays("cls")
    assert [r["n_train"] for r in res.per_try] == [n * 10 for n in (1, 2, 5) for _ in range(3)]
    assert [r["n_train"] for r in res.summary] == [10, 20, 50]  # a count, printed as one (not 10.0000)
    assert all(isinstance(r["n_train"], int) for r in res.summary)
    for summary in res.summary:
        n = summary["shots"]
        accs = []
        for t in range(3):
            idx = few_shot_rows(train_y, None, n, few_shot_rng(0, n, t))
            assert np.all(np.bincount(train_y[idx], minlength=10) == n)
            with pytest.warns(UserWarning) if n * 10 < 20 else contextlib.nullcontext():
                accs.append(knn_eval(train_x[idx], train_y[idx], test_x, test_y, ks=(20,), num_classes=10)[20]["top1"])
        assert summary["top1_mean"] == pytest.approx(np.mean(accs))
        assert summary["top1_std"] == pytest.approx(np.std(accs))
    means = [s["top1_mean"] for s in res.summary]
    assert means[0] < means[1] < means[2]


def test_few_shot_grouped_draws_whole_groups():
    y = np.repeat(np.arange(3), 12)
    groups = [f"g{i // 4}" for i in range(len(y))]  # 9 groups of 4 rows, one class each
    idx = few_shot_rows(y, groups, 5, np.random.default_rng(0))
    drawn = {groups[i] for i in idx}
    assert all(sum(g == d for g in groups) == sum(groups[i] == d for i in idx) for d in drawn)  # whole groups
    assert np.all(np.bincount(y[idx], minlength=3) >= 5)


def test_knn_and_probe_shots_cli(digits_feature_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["knn", str(digits_feature_file), "--k", "10", "--shots", "1,5", "--tries", "2",
                              "--json", "-", "-q", "--out", str(tmp_path / "knn")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["shots"] for r in data["few_shot"]] == [1, 5] and data["few_shot"][0]["tries"] == 2
    assert (tmp_path / "knn" / "figures" / "few_shot.png").is_file()
    res = runner.invoke(cli, ["probe", str(digits_feature_file), "--shots", "2", "--tries", "1", "--Cs", "0.1,1",
                              "-q"])
    assert res.exit_code == 0, res.output
    assert "few-shot probe" in res.output


def test_compare_shots_draws_one_curve_per_backbone(files, tmp_path):
    res = compare([files["noisy"], files["good"]], bootstrap=20, shots=(1, 2), tries=2)
    assert set(res.few_shot) == {"noisy.h5", "good.h5"}
    assert {r["file"] for r in res.to_json()["shots"]} == {"noisy.h5", "good.h5"}
    res.save(tmp_path / "run")
    for name in ("few_shot_knn.png", "few_shot_probe.png", "compare_top1.png"):
        assert (tmp_path / "run" / "figures" / name).is_file()


def _pair(res, method: str = "probe", metric: str = "top1") -> tuple[str, str, float, list[float]]:
    pair = next(p for p in res.pairs if p["method"] == method and p["metric"] == metric)
    return pair["a"], pair["b"], pair["diff"], pair["ci"]


def test_groups_of_one_file_serve_every_file_in_either_order(tmp_path, digits_arrays):
    """A file extracted without groups beside one with patients: the bootstrap resamples patients
    whichever file comes first, so the same two files give the same intervals in both orders,
    equal to a plain-numpy paired bootstrap over the patients."""
    grouped = _write(tmp_path / "grouped.h5", digits_arrays, 1.0)
    plain = _write(tmp_path / "plain.h5", digits_arrays, groups=False)
    ab = compare([grouped, plain], bootstrap=BOOT, seed=0)
    ba = compare([plain, grouped], bootstrap=BOOT, seed=0)
    assert ab.config["grouped"] and ba.config["grouped"]
    assert any("groups of grouped.h5 are used for every file" in n for n in ba.notes)
    a, b, diff, ci = _pair(ba)
    assert _pair(ab) == (a, b, pytest.approx(diff), pytest.approx(ci))
    y = ba.test_y
    patients = [f"test-p{i // 3}" for i in range(len(y))]
    top1 = {f: ba.proba[(f, "probe")].argmax(1) == y for f in (a, b)}
    diffs = [top1[a][ix].mean() - top1[b][ix].mean() for ix in resample_indices(len(y), BOOT, patients, 0)]
    assert ci == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])))


def test_files_with_other_groups_or_val_in_one_only_are_refused(tmp_path, digits_arrays):
    a = _write(tmp_path / "a.h5", digits_arrays)
    b = _write(tmp_path / "b.h5", digits_arrays)
    import h5py

    with h5py.File(b, "a") as f:  # the same images, another patient for one test image
        groups = f["test/groups"][()]
        groups[4] = b"test-someone-else"
        f["test/groups"][...] = groups
    with pytest.raises(ValueError, match=r"b.h5 split 'test' row 4 is in group 'test-someone-else'.*--group-column"):
        compare([a, b], bootstrap=10)
    no_val = tmp_path / "noval.h5"
    write_arrays(no_val, {s: {"cls": x, "labels": y, "paths": [f"{s}/{y[i]}/{i:05d}.png" for i in range(len(y))],
                              "groups": [f"{s}-p{i // 3}" for i in range(len(y))]}
                          for s, (x, y) in digits_arrays.items() if s != "val"},
                 [str(c) for c in range(10)], {"model": "noval", "tokens": "none", "dtype": "float32"}).close()
    for order in ([a, no_val], [no_val, a]):
        with pytest.raises(ValueError, match=r"a.h5 has a 'val' split but noval.h5 has none.*--val-split none"):
            compare(order, bootstrap=10)
    both = compare([a, no_val], bootstrap=10, val_split="none")
    assert both.config["val_split"] is None


def test_ranking_note_when_the_primary_metric_is_undefined_everywhere(tmp_path, digits_arrays):
    """Binary, and the test split holds no row of the positive class: every AUROC is undefined, so
    the ranked table says its order is not a measurement of AUROC."""
    arrays = dict(digits_arrays)
    x, y = arrays["test"]
    keep = y != 3
    arrays["test"] = (x[keep], y[keep])
    a = _write(tmp_path / "a.h5", arrays, binary=True, groups=False)
    b = _write(tmp_path / "b.h5", arrays, 1.5, binary=True, groups=False)
    res = compare([b, a], bootstrap=20, positive_class="three")
    assert all(r["value"] is None for r in res.rows if r["metric"] == "auroc")
    assert any("undefined on 'test' for every file" in n and "in the order given" in n for n in res.notes)


def test_refusal_names_each_files_own_row(tmp_path, digits_arrays):
    """With unlabelled rows before it, the differing image's row in the file is named, not its
    position among the usable rows."""
    a = _write(tmp_path / "a.h5", digits_arrays)
    b = _write(tmp_path / "b.h5", digits_arrays, moved_row=7)
    import h5py

    for path in (a, b):
        with h5py.File(path, "a") as f:
            labels = f["test/labels"][()]
            labels[2] = -1  # one unlabelled row before the moved one, in both files
            f["test/labels"][...] = labels
    with pytest.raises(ValueError, match=r"b.h5 split 'test' row 7 is 'test/elsewhere.png' where a.h5 has "
                                         r"'test/\d/00007.png' \(its row 7; usable row 6 of both\)"):
        compare([a, b], bootstrap=10)


def test_a_leak_in_shared_groups_is_said_of_every_file(tmp_path, digits_arrays):
    """A file without groups takes another's: it shares that file's leak too (same images, same
    splits), and the notes say so for it, not only for the file that carries the groups."""
    import h5py

    grouped = _write(tmp_path / "grouped.h5", digits_arrays)
    plain = _write(tmp_path / "plain.h5", digits_arrays, groups=False)
    with h5py.File(grouped, "a") as f:  # one test image of a training patient
        groups = f["test/groups"][()]
        groups[0] = b"train-p0"
        f["test/groups"][...] = groups
    res = compare([plain, grouped], bootstrap=10)
    assert any(n.startswith("plain.h5 (no groups of their own, the same images): leakage") for n in res.notes)
    # the rows and groups are shared, so each method's leak is said once, for every file (was once per file)
    assert [n for n in res.notes if "leakage" in n and "plain.h5" not in n] == [
        "k-NN: leakage: 1 group(s) appear in more than one of the splits test, train (e.g. 'train-p0' in test, train); "
        "the same patient on both sides inflates every number. Re-split by group (featcache split --group).",
        "probe: leakage: 1 group(s) appear in more than one of the splits test, train, val (e.g. 'train-p0' in test, "
        "train); the same patient on both sides inflates every number. Re-split by group (featcache split --group)."]


def test_compare_refuses_files_computed_from_other_image_bytes(tiny_vit, digits_dir, tmp_path):
    """Two extractions of one model, the second from a copy of the data where two test images of different
    classes had swapped contents under the same names: compare called the gap between identical backbones
    real (only paths and labels were checked, never the recorded content hashes)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_dir, copy)
    a, b = sorted((copy / "test" / "0").glob("*.png"))[0], sorted((copy / "test" / "1").glob("*.png"))[0]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for data, out in ((digits_dir, "a.h5"), (copy, "b.h5"), (digits_dir, "c.h5")):
        r = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(data), "--out",
                                     str(tmp_path / out), "--workers", "0", "-q"])
        assert r.exit_code == 0, r.output
    with pytest.raises(ValueError, match=r"b.h5 split 'test' row \d+ \('test/0/.*'\) was computed from other image "
                                         r"bytes than a.h5's row of that name \(2 such rows"):
        compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20, val_split="none")
    compare([tmp_path / "a.h5", tmp_path / "c.h5"], bootstrap=20, val_split="none")  # the same bytes: accepted


def test_rows_without_patient_ids_are_their_own_patients_in_every_file(tmp_path, digits_arrays):
    """The id-less rows' keys were made from each file's own row number, so an extra unusable row in one
    file made compare refuse identical groups, printing the internal key '\\x00test:1'."""
    x, y = digits_arrays["test"]
    groups = ["" if i % 5 == 0 else f"p{i // 3}" for i in range(len(y))]
    base = {s: {"cls": digits_arrays[s][0], "labels": digits_arrays[s][1],
                "paths": [f"{s}/{i}.png" for i in range(len(digits_arrays[s][1]))]} for s in ("train", "val")}
    test = {"cls": x, "labels": y, "paths": [f"test/{i}.png" for i in range(len(y))], "groups": groups}
    extra = {"cls": np.vstack([x[:1], x]), "labels": np.concatenate([[-1], y]), "groups": ["q"] + groups,
             "paths": ["test/unlabelled.png"] + test["paths"]}
    classes = [str(c) for c in range(10)]
    write_arrays(tmp_path / "a.h5", {**base, "test": test}, classes, {"model": "a"}).close()
    write_arrays(tmp_path / "b.h5", {**base, "test": extra}, classes, {"model": "b"}).close()
    res = compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20)
    assert res.config["grouped"] is True
    # an extra unusable train row: b's id-less train rows get keys of other row numbers, but both files
    # must be drawn by one grouping (the same few-shot draws, the same curves)
    tx, ty = digits_arrays["train"]
    tgroups = ["" if i % 3 == 0 else f"t{i // 4}" for i in range(len(ty))]
    train = {"cls": tx, "labels": ty, "paths": [f"train/{i:04d}.png" for i in range(len(ty))], "groups": tgroups}
    train_b = {"cls": np.vstack([tx[:1], tx]), "labels": np.concatenate([[-1], ty]), "groups": ["q"] + tgroups,
               "paths": ["train/-unlabelled.png"] + train["paths"]}
    write_arrays(tmp_path / "d.h5", {"train": train, "test": test}, classes, {"model": "d"}).close()
    write_arrays(tmp_path / "e.h5", {"train": train_b, "test": test}, classes, {"model": "e"}).close()
    res = compare([tmp_path / "d.h5", tmp_path / "e.h5"], bootstrap=20, shots=(1, 2), tries=3, val_split="none")
    assert res.few_shot["d.h5"]["knn"].summary == res.few_shot["e.h5"]["knn"].summary
    assert res.rows[0]["value"] == next(r["value"] for r in res.rows if r["file"] != res.rows[0]["file"]
                                        and r["method"] == res.rows[0]["method"] and r["metric"] == res.rows[0]["metric"])
    other = dict(test, groups=["" if i % 5 == 1 else f"p{i // 3}" for i in range(len(y))])
    write_arrays(tmp_path / "c.h5", {**base, "test": other}, classes, {"model": "c"}).close()
    with pytest.raises(ValueError, match=r"c.h5 split 'test' row 0 is in group 'p0' but a.h5 puts the same image "
                                         r"in no group \(no patient id\)") as err:
        compare([tmp_path / "a.h5", tmp_path / "c.h5"], bootstrap=20)
    assert "\x00" not in str(err.value)


def test_compare_says_what_its_numbers_rest_on(tmp_path, digits_arrays):
    """Few resamples gave '95% CIs' excluding their own point and a vanished figure (compare_plot raised
    on negative error bars and save swallowed it); a class absent from test, the probe's CV, the
    positive class and a refitted probe's coverage went unsaid or were said wrongly."""
    from featcache.plots import compare_plot
    from featcache.report import compare_tables

    rows = [{"file": "a", "method": "probe", "metric": "top1", "value": 0.77, "ci": [0.81, 0.81]}]
    assert compare_plot(rows, tmp_path / "fig", metric="top1")[0].exists()  # an interval beside its point is drawn
    classes = [str(c) for c in range(10)]
    cut = {}
    for s in ("train", "val", "test"):
        x, y = digits_arrays[s]
        keep = (y != 9) if s != "val" else np.ones(len(y), bool)  # class 9 only in val
        cut[s] = {"cls": x[keep], "labels": y[keep], "paths": [f"{s}/{i}.png" for i in np.flatnonzero(keep)]}
    for name in ("a", "b"):
        write_arrays(tmp_path / f"{name}.h5", cut, classes, {"model": name}).close()
    res = compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20)
    notes = " | ".join(res.notes)
    assert "20 resamples are too few for 95% percentile intervals" in notes
    assert "classes absent from 'test': 9" in notes
    assert "k-NN: the train split lacks classes 9" in notes  # true of the neighbours
    assert "probe: the train" not in notes  # the probe is refitted on train + val, which has class 9
    res.save(tmp_path / "run")
    assert (tmp_path / "run" / "figures" / "compare_top1.png").exists()
    res = compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20, val_split="none")
    assert any("the probe chose C by cross-validation on 'train'" in n for n in res.notes)
    metrics = {"ranking": ["a", "b"], "primary_metric": "auroc", "positive_class": "three", "rows": [],
               "pairs": [{"a": "a", "b": "b", "method": m, "metric": "auroc", "diff": 0.1, "ci": [0.0, 0.2]}
                         for m in ("knn", "probe")]}
    (title_ranked, _, _), (title_pairs, _, diffs) = compare_tables(metrics)
    assert "positive class three" in title_ranked and "positive class three" in title_pairs
    assert diffs[0][2] == "probe"  # the ranking's own pairs first, should the table be cut


def test_compare_names_the_real_cause_of_a_row_mismatch(tmp_path, digits_arrays):
    """A row one file could not use (unlabelled, failed) was blamed on 'different images'; a validation
    split named 'validation' in one file and 'val' in the other read as 'has none'."""
    classes = [str(c) for c in range(10)]
    splits = {s: {"cls": digits_arrays[s][0], "labels": digits_arrays[s][1].copy(),
                  "paths": [f"{s}/{i}.png" for i in range(len(digits_arrays[s][1]))]} for s in ("train", "val", "test")}
    write_arrays(tmp_path / "a.h5", splits, classes, {"model": "a"}).close()
    splits["test"]["labels"][7] = -1
    write_arrays(tmp_path / "b.h5", splits, classes, {"model": "b"}).close()
    with pytest.raises(ValueError, match=r"'test/7.png' \(split 'test'\) is usable in a.h5 but not in b.h5, which lists "
                                         r"it without features or without a label"):
        compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20)
    splits["test"]["labels"][7] = digits_arrays["test"][1][7]
    last = len(splits["test"]["labels"]) - 1
    splits["test"]["labels"][last] = -1  # the last row: the usable rows differ in number only
    write_arrays(tmp_path / "b.h5", splits, classes, {"model": "b"}, overwrite=True).close()
    with pytest.raises(ValueError, match=rf"'test/{last}.png' \(split 'test'\) is usable in a.h5 but not in b.h5"):
        compare([tmp_path / "a.h5", tmp_path / "b.h5"], bootstrap=20)
    splits["test"]["labels"][last] = digits_arrays["test"][1][last]
    renamed = {("validation" if s == "val" else s): v for s, v in splits.items()}
    write_arrays(tmp_path / "c.h5", renamed, classes, {"model": "c"}).close()
    with pytest.raises(ValueError, match=r"a.h5 names the validation split 'val' but c.h5 names it 'validation'"):
        compare([tmp_path / "a.h5", tmp_path / "c.h5"], bootstrap=20)


def test_compare_records_each_probes_c_and_says_when_a_probe_predicts_one_class(tmp_path, digits_arrays):
    """compare hid each file's chosen C, and a probe whose features carry nothing (here: constant) scored
    its one predicted class's share as top-1 without comment."""
    good = _write(tmp_path / "good.h5", digits_arrays, groups=False)
    flat = {s: (np.zeros_like(x), y) for s, (x, y) in digits_arrays.items()}
    blank = _write(tmp_path / "blank.h5", flat, groups=False)
    res = compare([good, blank], bootstrap=20)
    assert set(res.config["probe_C"]) == {"good.h5", "blank.h5"} and all(c > 0 for c in res.config["probe_C"].values())
    assert any(n.startswith("blank.h5 probe: the probe predicts ") and "for every test row" in n for n in res.notes)
    assert not any(n.startswith("good.h5 probe: the probe predicts") for n in res.notes)
    r = CliRunner().invoke(cli, ["compare", str(good), str(blank), "--bootstrap", "20", "-q"])
    assert r.exit_code == 0 and "probe C chosen: good.h5 " in r.output


def test_a_files_sensitivity_interval_is_wilson_not_a_flat_bootstrap(tmp_path):
    """4 positives of 40 test rows, all found: the paired bootstrap's percentile interval of each
    file's sensitivity was [1, 1] (the coverage study: such intervals held a true 0.88 in 43 % of
    test sets); it is now the Wilson interval train gives, and the report says how it was made."""
    from featcache.report import write_report
    from tests.conftest import wilson_by_patient

    rng = np.random.default_rng(0)
    paths, made = {}, {}
    for name, n, n_pos in (("train", 200, 40), ("val", 60, 12), ("test", 40, 4)):
        y = np.zeros(n, np.int64)
        y[:n_pos] = 1
        made[name] = y
        paths[name] = [f"{name}/{i:04d}.png" for i in range(n)]
    for stem, shift in (("sharp", 4.0), ("blurred", 3.0)):
        splits = {}
        for name, y in made.items():
            x = rng.normal(size=(len(y), 8)).astype(np.float32)
            x[:, 0] += shift * y
            splits[name] = {"cls": x, "labels": y, "paths": paths[name]}
        write_arrays(tmp_path / f"{stem}.h5", splits, ["benign", "malignant"], {"model": stem}).close()
    res = compare([tmp_path / "sharp.h5", tmp_path / "blurred.h5"], bootstrap=BOOT, positive_class="malignant")
    y = res.test_y
    for f in res.files:
        pred = (res.proba[(f, "probe")][:, 1] >= 0.5).astype(int)
        row = next(r for r in res.rows if r["file"] == f and r["method"] == "probe" and r["metric"] == "sensitivity")
        hits = (pred[y == 1] == 1).astype(float)
        assert row["value"] == pytest.approx(hits.mean())
        assert row["ci"] == pytest.approx(wilson_by_patient(hits), abs=1e-12) and row["interval"] == "wilson"
        if hits.mean() == 1.0:
            assert row["ci"][0] < 0.6  # Wilson at 4 of 4: [0.51, 1]
    # as train and probe say it of the same rows (compare said nothing of the 4 positives)
    assert any("fewer than 10 rows of malignant (4 rows)" in n for n in res.notes), res.notes
    flat = [r for r in res.rows if r["interval"] == "bootstrap" and r["ci"] and r["ci"][0] == r["ci"][1]]
    assert flat  # the sharp file separates its 4 positives: AUROC 1 in every resample
    for r in flat:
        assert any(f"the {r['file']} {r['method']} {r['metric']} interval" in n and "zero width" in n for n in res.notes)
    res.save(tmp_path / "run")
    report = write_report([tmp_path / "run"], tmp_path / "report")["md"].read_text()
    report = report.replace("\\", "")  # Markdown escapes
    assert "Wilson score for each file's top1, sensitivity, specificity" in report
    assert f"{BOOT} paired bootstrap resamples for each file's auroc, balanced_accuracy and every difference" in report


def _grouped_binary(path: Path) -> Path:
    """Binary file whose benign patients have 6 images each and malignant ones 1: a drawn set of
    whole patients is imbalanced (3 shots: 6 benign rows, 3 malignant)."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n_benign, n_malignant in (("train", 10, 30), ("val", 5, 10), ("test", 8, 20)):
        y = np.r_[np.zeros(6 * n_benign, np.int64), np.ones(n_malignant, np.int64)]
        groups = [f"{name}-b{i // 6}" for i in range(6 * n_benign)] + [f"{name}-m{i}" for i in range(n_malignant)]
        x = rng.normal(size=(len(y), 6)).astype(np.float32)
        x[:, 0] += 1.2 * y
        splits[name] = {"cls": x, "labels": y, "groups": groups, "paths": [f"{name}/{i:04d}.png" for i in range(len(y))]}
    write_arrays(path, splits, ["benign", "malignant"], {"model": "m", "dtype": "float32"}).close()
    return path


def test_few_shot_says_rows_per_class_scores_auroc_and_keeps_the_class_weight(tmp_path):
    """With patients a shot is a row but whole patients are drawn, so 3 shots gave 6 + 3 rows and only
    the total was said; binary tasks had no AUROC (compare ranks them by it); probe --class-weight
    balanced was dropped for the few-shot probes without a word."""
    from sklearn.metrics import roc_auc_score

    from featcache.probe import LogisticProbe

    path = _grouped_binary(tmp_path / "b.h5")
    with FeatureStore(path) as store:
        train_x, train_y, _ = store["train"].arrays("cls")
        test_x, test_y, _ = store["test"].arrays("cls")
        val_x, val_y, _ = store["val"].arrays("cls")
        groups = store["train"].groups
        knn = few_shot(store, method="knn", shots=(3,), tries=3, k=5, seed=0, positive_class="malignant")
        weighted = few_shot(store, method="probe", shots=(3,), tries=3, seed=0, Cs=(0.01, 1.0),
                            positive_class="malignant", class_weight="balanced")
    for res in (knn, weighted):
        for t, row in enumerate(res.per_try):
            idx = few_shot_rows(train_y, groups, 3, few_shot_rng(0, 3, t))
            assert row["n_train_per_class"] == dict(zip(["benign", "malignant"], np.bincount(train_y[idx], minlength=2)))
    assert knn.per_try[0]["n_train_per_class"]["benign"] >= 6  # one benign patient is 6 rows
    aurocs = []
    for t, row in enumerate(knn.per_try):
        idx = few_shot_rows(train_y, groups, 3, few_shot_rng(0, 3, t))
        # plain numpy k-NN vote (DINO's exp(sim / T)) of the malignant class, scored by scikit-learn
        a = train_x[idx] / np.linalg.norm(train_x[idx], axis=1, keepdims=True)
        b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
        sim = b @ a.T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :5]
        w = np.exp(np.take_along_axis(sim, top, 1) / 0.07)
        score = (w * (train_y[idx][top] == 1)).sum(1) / w.sum(1)
        aurocs.append(roc_auc_score(test_y, score))
        assert row["auroc"] == pytest.approx(aurocs[-1], abs=1e-9)
    assert knn.summary[0]["auroc_mean"] == pytest.approx(np.mean(aurocs))
    per_class = {c: [r["n_train_per_class"][c] for r in knn.per_try] for c in ("benign", "malignant")}
    assert knn.summary[0]["n_train_per_class"] == {c: v[0] if len(set(v)) == 1 else np.mean(v)
                                                   for c, v in per_class.items()}
    assert weighted.config["class_weight"] == "balanced" and weighted.config["threshold"] == 0.5
    for t, row in enumerate(weighted.per_try):
        idx = few_shot_rows(train_y, groups, 3, few_shot_rng(0, 3, t))
        probe = LogisticProbe(Cs=(0.01, 1.0), refit=False, class_weight="balanced").fit(train_x[idx], train_y[idx],
                                                                                       val_x, val_y)
        p = probe.predict_proba(test_x)[:, 1]
        assert row["auroc"] == pytest.approx(roc_auc_score(test_y, p), abs=1e-9)
        assert row["top1"] == pytest.approx(np.mean((p >= 0.5) == test_y))
