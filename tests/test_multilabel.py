"""Multi-label studies (chest X-ray-like findings): what a head, a probe and k-NN may claim about a
finding, per-label intervals, and the checks every command applies before it reports."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

import featcache as fc
from featcache.metrics import bootstrap_metrics, resample_indices
from featcache.store import write_arrays
from featcache_cli.main import cli
from tests.conftest import wilson_by_patient

FINDINGS = ["effusion", "nodule", "mass", "hernia"]


def _study(tmp_path, no_hernia_in_train: bool = False, val: bool = True, seed: int = 0, train_patients: int = 60):
    """Rows of 4 images per patient, 4 findings carried by 4 feature dimensions; nodule is rare."""
    rng = np.random.default_rng(seed)
    rates = np.array([0.3, 0.08, 0.15, 0.1])

    def split(patients: int, name: str) -> dict:
        y = (rng.random((patients, 4)) < rates).astype(np.int64).repeat(4, axis=0)
        x = rng.normal(size=(len(y), 12)).astype(np.float32)
        x[:, :4] += 1.5 * y
        return {"cls": x, "labels": y, "groups": [f"{name}{i // 4}" for i in range(len(y))]}

    splits = {"train": split(train_patients, "tr"), "val": split(25, "va"), "test": split(30, "te")}
    if no_hernia_in_train:
        splits["train"]["labels"][:, 3] = 0
    if not val:
        del splits["val"]
    path = tmp_path / f"ml{int(no_hernia_in_train)}{int(val)}.h5"
    write_arrays(path, splits, FINDINGS, {"model": "m"}).close()
    return path


def test_a_finding_never_positive_in_train_is_flagged_and_left_untuned(tmp_path):
    """hernia without a positive in train got a Youden threshold 'chosen on validation' and its chance AUROC
    went into the macro average silently; the probe fitted it as a constant and saved threshold 0.0,
    so predict called every image positive."""
    path = _study(tmp_path, no_hernia_in_train=True)
    t = fc.train_head(path, metric="auroc", lr=0.02, epochs=5)
    t.apply_threshold("youden")
    p = fc.run_probe(fc.open(path), Cs=[0.1, 1.0], refit=False, threshold="youden", metric="auroc")
    for notes, record in ((t.notes_, t.extra_metrics_["threshold"]), (p.warnings, p.metrics()["threshold"])):
        assert any("one class only for label(s) hernia (no positives)" in n and "macro averages" in n for n in notes)
        assert any("train has one class only for label hernia (no positives in train)" in n for n in notes)
        assert "hernia" in record["untuned"] and record["value"][3] == 0.5
    p.save(tmp_path / "probe")
    pred = fc.predict(tmp_path / "probe", path)
    assert not pred.decisions()[:, 3].all()  # threshold 0.0 called every image positive


def test_multi_label_accuracy_selection_that_beats_no_one_is_flagged(tmp_path):
    """Per-label accuracy at 0.5 (the default --metric) kept a near-chance epoch below the score of calling
    every finding absent, without the note single-label runs get."""
    t = fc.train_head(_study(tmp_path), lr=1e-4, epochs=2)
    none = 1 - np.mean(t.val_y_ > 0)
    assert t.best_score_ < none
    assert any(f"below the {none:.4f} of calling every finding absent" in n and "--metric auroc" in n
               for n in t.notes_), t.notes_


def test_positive_class_is_refused_on_multi_label_files(tmp_path):
    path = _study(tmp_path)
    for cmd in (["train", str(path), "--epochs", "1"], ["knn", str(path)], ["probe", str(path), "--Cs", "1"]):
        r = CliRunner().invoke(cli, cmd + ["--positive-class", "nodule", "-q"])
        assert r.exit_code == 1 and "--positive-class applies to binary tasks; this file is multi-label" in r.output


def test_probe_folds_are_stratified_by_the_rarest_finding(tmp_path, monkeypatch):
    """Without a val split the multi-label probe used plain GroupKFold: folds without a rare finding
    averaged macro AUROC over fewer labels than the others."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = []
    real = StratifiedGroupKFold.split

    def spy(self, x, y=None, groups=None):
        for tr, va in real(self, x, y, groups):
            folds.append(va)
            yield tr, va

    monkeypatch.setattr(StratifiedGroupKFold, "split", spy)
    path = _study(tmp_path, val=False, seed=3, train_patients=120)
    y = fc.open(path)["train"].labels
    assert (y[:, 1].sum() // 4) >= 5  # at least one nodule patient per fold is possible
    fc.run_probe(fc.open(path), Cs=[1.0], refit=False, cv=5)
    assert len(folds) == 5 and all(y[va, 1].any() for va in folds)


def test_probe_threshold_rules_without_a_validation_split(tmp_path, monkeypatch):
    """youden without a val split was refused only after the whole CV sweep; a number was refused too."""
    from featcache.probe import LogisticProbe

    path = _study(tmp_path, val=False)
    real_fit = LogisticProbe.fit
    monkeypatch.setattr(LogisticProbe, "fit", lambda *a, **k: pytest.fail("fitted before refusing"))
    with pytest.raises(ValueError, match="--threshold youden is chosen on a validation split; ml00.h5 has none"):
        fc.run_probe(fc.open(path), Cs=[1.0], refit=False, threshold="youden")
    monkeypatch.setattr(LogisticProbe, "fit", real_fit)
    res = fc.run_probe(fc.open(path), Cs=[1.0], refit=False, threshold="0.3")
    assert res.metrics()["threshold"]["value"] == [0.3] * 4


def test_per_label_intervals_and_the_console_table(tmp_path):
    """--bootstrap gave multi-label runs one interval (macro AUROC) and no per-label sensitivity /
    specificity on the console; each finding now has its AUROC interval, computed on the same
    patient resamples (checked against numpy + scikit-learn here), and Wilson intervals of its
    sensitivity and specificity, patients counted by design effect (checked against a loop)."""
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < [0.4, 0.1, 0.3]).astype(int)
    proba = np.clip(0.5 * y + rng.random((200, 3)) * 0.6, 0, 1)
    groups = [f"p{i // 2}" for i in range(200)]
    boot = bootstrap_metrics(y, proba, metrics=["auroc"], n_boot=300, groups=groups, seed=4, threshold=[0.5, 0.4, 0.6],
                             label_names=["a", "b", "c"])
    for j, t in enumerate([0.5, 0.4, 0.6]):
        values = []
        for idx in resample_indices(200, 300, groups, 4):
            yb, pb = y[idx, j], proba[idx, j]
            if 0 < yb.sum() < len(yb):
                values.append(roc_auc_score(yb, pb))
        np.testing.assert_allclose(boot.per_label[j]["auroc"], np.quantile(values, [0.025, 0.975]), rtol=0, atol=1e-12)
        assert boot.per_label_n_valid[j] == {"auroc": len(values)}
        for m, rows, hits in (("sensitivity", y[:, j] == 1, proba[:, j] >= t), ("specificity", y[:, j] == 0, proba[:, j] < t)):
            reference = wilson_by_patient(hits[rows], [g for g, r in zip(groups, rows) if r])
            np.testing.assert_allclose(boot.per_label[j][m], reference, rtol=0, atol=1e-12)
    path = _study(tmp_path)
    r = CliRunner().invoke(cli, ["train", str(path), "--lr", "0.02", "--epochs", "5", "--metric", "auroc", "--threshold",
                                 "youden", "--bootstrap", "100", "-q", "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert "per label (test)" in r.output and "sensitivity 95% CI" in r.output and "hernia" in r.output
    test = json.loads((tmp_path / "t.json").read_text())["test"]
    assert [e["label"] for e in test["per_label"]] == FINDINGS
    for e in test["per_label"]:
        pos, n = e["positives"], test["n"]
        assert set(e["ci"]) == {m for m, ok in (("auroc", 0 < pos < n), ("sensitivity", pos > 0),
                                                ("specificity", pos < n)) if ok}
        for m, (lo, hi) in e["ci"].items():
            assert lo <= hi and (m != "auroc" or e["n_valid"][m] <= 100)  # resamples count for AUROC only


def test_report_names_each_findings_threshold(tmp_path):
    """The report's Chosen table printed a multi-label threshold as a bare list of floats."""
    from featcache.report import write_report

    t = fc.train_head(_study(tmp_path, no_hernia_in_train=True), lr=0.02, epochs=3, metric="auroc")
    t.apply_threshold("youden")
    t.save(tmp_path / "run")
    write_report([tmp_path / "run"], tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text()
    values = t.extra_metrics_["threshold"]["value"]
    assert (f"effusion {values[0]:.4f}, nodule {values[1]:.4f}, mass {values[2]:.4f}, hernia 0.5000 (youden, chosen "
            f"on validation; the default 0.5 for nodule (no positives in validation), hernia (no positives in "
            f"train))") in page  # the wording train and predict print, each finding's reason named
    assert "<td>val_split</td><td>default (val)</td>" in page  # was 'none' beside the val metrics


def test_a_small_multi_label_train_split_still_cross_validates(tmp_path):
    """Stratifying folds by the rarest finding crashed scikit-learn ('n_splits=5 cannot be greater than the
    number of members in each class') when every finding had fewer rows than folds; such a split gets
    plain group folds."""
    rng = np.random.default_rng(2)
    y = np.eye(4, dtype=np.int64)[np.arange(16) % 4]  # 4 rows of each finding, 5 folds
    x = rng.normal(size=(16, 6)).astype(np.float32) + y @ rng.normal(size=(4, 6)).astype(np.float32)
    write_arrays(tmp_path / "s.h5", {"train": {"cls": x, "labels": y}, "test": {"cls": x, "labels": y}}, FINDINGS,
                 {"model": "m"}).close()
    res = fc.run_probe(fc.open(tmp_path / "s.h5"), Cs=[0.1, 1.0], refit=False, cv=5)
    assert res.probe.best_C_ in (0.1, 1.0)


def test_predict_says_which_thresholds_it_applied(tmp_path):
    """A multi-label predict with --threshold 0.3 printed '(thresholds: --threshold)' without the value."""
    path = _study(tmp_path)
    t = fc.train_head(path, lr=0.02, epochs=2, metric="auroc")
    t.apply_threshold("youden")
    t.save(tmp_path / "run")
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run"), str(path), "--out", str(tmp_path / "p.csv"),
                                 "--threshold", "0.3", "-q"])
    assert r.exit_code == 0 and "(thresholds 0.3 for every label: --threshold)" in r.output, r.output
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run"), str(path), "--out", str(tmp_path / "p.csv"), "-q"])
    values = t.extra_metrics_["threshold"]["value"]
    assert r.exit_code == 0 and f"(thresholds effusion {values[0]:.4g}, nodule " in r.output, r.output


def test_train_predict_and_report_say_where_a_threshold_came_from_in_the_same_words(tmp_path):
    """The train console said 'threshold youden chosen on validation; 0.5 for hernia', predict
    'saved (youden, chosen on validation; left at 0.5 for hernia (one class in validation))' — for a
    finding that had no positive in *train* — and the report '(youden, chosen on val; the default for
    hernia)': three accounts of one threshold, one of them wrong about why."""
    from featcache.report import write_report

    path = _study(tmp_path, no_hernia_in_train=True)
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", str(path), "--epochs", "3", "--lr", "0.02", "--threshold", "youden",
                                 "--out", str(run)])
    assert r.exit_code == 0, r.output
    record = fc.load_run(run).metrics["threshold"]
    assert record["untuned_why"]["hernia"] == "no positives in train"
    assert all(record["untuned_why"][n].startswith("no positives in ") for n in record["untuned"])
    why = ", ".join(f"{n} ({record['untuned_why'][n]})" for n in record["untuned"])
    words = f"youden, chosen on validation; the default 0.5 for {why}"
    assert f"threshold ({words}): " in r.output
    pred = fc.predict(run, path)
    assert pred.threshold_source.startswith(f"saved ({words}: ")
    write_report([run], tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert f"({words})</td>" in page
    chosen = page[page.index("<h3>Chosen</h3>"):]  # prose values wrap (the cell made the table scroll sideways)
    assert chosen.split("<table>")[0].split() == ["<h3>Chosen</h3>", "<div", "class='scroll", "wrap'>"] and ".wrap td:last-child{white-space:normal" in page
