"""Grouped, stratified splits: no group leaks, fractions and class proportions are kept."""
from __future__ import annotations

import csv
from collections import Counter, defaultdict

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.splitting import (grouped_split, holdout_split, stratify_key,
                                 summarize_split)


def random_manifest(rng: np.random.Generator, n_groups: int | None = None, n_classes: int | None = None,
                    mixed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random patients with 1-8 images each; labels mostly per patient, sometimes mixed."""
    n_groups = n_groups or int(rng.integers(3, 120))
    n_classes = n_classes or int(rng.integers(2, 6))
    sizes = rng.integers(1, 9, n_groups)
    p = rng.dirichlet(np.ones(n_classes))
    groups = np.repeat([f"p{g:03d}" for g in rng.permutation(n_groups)], sizes)
    labels = np.repeat(rng.choice(n_classes, n_groups, p=p), sizes)
    if mixed:  # some images of a patient carry another finding
        flip = rng.random(len(labels)) < 0.1
        labels[flip] = rng.integers(0, n_classes, flip.sum())
    order = rng.permutation(len(labels))
    return np.array([f"c{v}" for v in labels[order]]), groups[order]


def split_of_each_group(groups, split) -> dict[str, set]:
    seen: dict[str, set] = defaultdict(set)
    for g, s in zip(groups, split):
        seen[g].add(s)
    return seen


def test_no_group_is_ever_in_two_splits():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        labels, groups = random_manifest(rng)
        val, test = rng.choice([0.0, 0.1, 0.15, 0.2]), rng.choice([0.1, 0.2, 0.3])
        split = grouped_split(labels, groups, val=val, test=test, stratify=bool(seed % 2), seed=seed)
        assert len(split) == len(labels)
        assert set(split) <= {"train", "val", "test"}
        assert all(len(s) == 1 for s in split_of_each_group(groups, split).values()), seed
        # every split with a positive fraction gets at least one group
        assert "train" in set(split) and "test" in set(split)
        assert (val == 0) == ("val" not in set(split))


def test_row_fractions_are_roughly_honoured():
    for seed in range(10):
        labels, groups = random_manifest(np.random.default_rng(seed), n_groups=300)
        split = grouped_split(labels, groups, val=0.1, test=0.2, seed=seed)
        frac = {s: np.mean(split == s) for s in ("train", "val", "test")}
        assert frac["train"] == pytest.approx(0.7, abs=0.03)
        assert frac["val"] == pytest.approx(0.1, abs=0.03)
        assert frac["test"] == pytest.approx(0.2, abs=0.03)


def _max_proportion_gap(labels, split) -> float:
    overall = Counter(labels)
    gap = 0.0
    for s in ("train", "val", "test"):
        sub = Counter(labels[split == s])
        n = sum(sub.values())
        gap = max(gap, max(abs(sub[c] / n - overall[c] / len(labels)) for c in overall))
    return gap


def test_stratification_keeps_class_proportions():
    gaps_strat, gaps_plain = [], []
    for seed in range(10):
        labels, groups = random_manifest(np.random.default_rng(100 + seed), n_groups=300, n_classes=4)
        gaps_strat.append(_max_proportion_gap(labels, grouped_split(labels, groups, seed=seed)))
        gaps_plain.append(_max_proportion_gap(labels, grouped_split(labels, groups, stratify=False, seed=seed)))
    assert max(gaps_strat) < 0.03
    assert np.mean(gaps_strat) < np.mean(gaps_plain)


def test_rare_class_reaches_every_split():
    rng = np.random.default_rng(0)
    groups = np.array([f"p{i // 3}" for i in range(600)])          # 200 patients, 3 images each
    labels = np.where(np.arange(200) < 12, "rare", "common").repeat(3)
    split = grouped_split(labels, groups, val=0.1, test=0.2, seed=int(rng.integers(1000)))
    for s in ("train", "val", "test"):
        assert np.sum(labels[split == s] == "rare") > 0


def test_same_seed_same_split_other_seed_other_split():
    labels, groups = random_manifest(np.random.default_rng(7), n_groups=100)
    a = grouped_split(labels, groups, seed=3)
    b = grouped_split(list(labels), list(groups), seed=3)
    c = grouped_split(labels, groups, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_without_groups_rows_are_split_and_stratified():
    labels = np.array(["a"] * 90 + ["b"] * 10)
    split = grouped_split(labels, None, val=0.1, test=0.2, seed=0)
    assert Counter(split) == {"train": 70, "val": 10, "test": 20}
    assert Counter(labels[split == "test"]) == {"a": 18, "b": 2}


def test_bad_fractions_and_too_few_groups_are_clear_errors():
    labels, groups = np.array(["a", "b", "a", "b"]), np.array(["p1", "p1", "p2", "p2"])
    with pytest.raises(ValueError, match=r"sum < 1"):
        grouped_split(labels, groups, val=0.5, test=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        grouped_split(labels, groups, val=-0.1)
    with pytest.raises(ValueError, match="2 groups cannot fill 3 splits"):
        grouped_split(labels, groups, val=0.1, test=0.2)


def test_multilabel_rarest_key_and_split():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 4)) < np.array([0.5, 0.2, 0.05, 0.3])).astype(np.uint8)
    key = stratify_key(y)
    freq = y.sum(axis=0)
    for row, k in zip(y[:50], key[:50]):   # plain-python reference of "the rarest positive label"
        pos = [j for j in range(4) if row[j]]
        assert k == (str(min(pos, key=lambda j: freq[j])) if pos else "(none)")
    combo = stratify_key(y, multilabel="combination")
    assert combo[0] == "".join(map(str, y[0]))
    groups = np.repeat(np.arange(200), 2)
    split = grouped_split(y, groups, seed=1)
    assert all(len(s) == 1 for s in split_of_each_group(groups, split).values())
    for s in ("train", "val", "test"):   # the rarest finding (5%) appears in every split
        assert y[split == s, 2].sum() > 0


def test_holdout_keeps_groups_whole():
    labels, groups = random_manifest(np.random.default_rng(3), n_groups=80)
    keep, hold = holdout_split(labels, groups, fraction=0.25, seed=0)
    assert sorted(np.concatenate([keep, hold]).tolist()) == list(range(len(labels)))
    assert not set(groups[keep]) & set(groups[hold])
    assert len(hold) / len(labels) == pytest.approx(0.25, abs=0.05)


def test_summary_counts_match_plain_counting():
    labels, groups = random_manifest(np.random.default_rng(5), n_groups=40)
    split = grouped_split(labels, groups, seed=0)
    summary = summarize_split(labels, groups, split)
    assert summary.leaked_groups == []
    for row in summary.rows:
        m = split == row["split"]
        assert row["rows"] == m.sum()
        assert row["groups"] == len(set(groups[m]))
        assert row["counts"] == {c: int(np.sum(labels[m] == c)) for c in summary.classes}


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cli():
    import featcache_cli.main as main

    return main.cli


def test_cli_split_writes_manifest_with_split_column(tmp_path):
    labels, groups = random_manifest(np.random.default_rng(11), n_groups=60, n_classes=3)
    manifest = tmp_path / "manifest.csv"
    _write_csv(manifest, ["path", "label", "patient_id", "age"],
               [[f"img/{i}.png", lab, g, str(40 + i % 30)] for i, (lab, g) in enumerate(zip(labels, groups))])
    out = tmp_path / "split_manifest.csv"
    res = CliRunner().invoke(_cli(), ["split", str(manifest), "--group", "patient_id", "--val", "0.1",
                                      "--test", "0.2", "--stratify", "--seed", "0", "--out", str(out),
                                      "--json", str(tmp_path / "split.json")])
    assert res.exit_code == 0, res.output
    rows = _read_csv(out)
    # the grouping column is copied as "group", so `featcache extract` keeps the patients as-is
    assert list(rows[0].keys()) == ["path", "label", "patient_id", "age", "group", "split"]
    assert all(r["group"] == r["patient_id"] for r in rows)
    assert [r["path"] for r in rows] == [f"img/{i}.png" for i in range(len(labels))]
    assert [r["label"] for r in rows] == list(labels)
    split = np.array([r["split"] for r in rows])
    assert all(len(s) == 1 for s in split_of_each_group(groups, split).values())
    np.testing.assert_array_equal(split, grouped_split(labels, groups, 0.1, 0.2, seed=0))
    for s in ("train", "val", "test"):   # the printed table has the real counts
        m = split == s
        line = next(ln for ln in res.output.splitlines() if ln.startswith(s))
        cells = line.split()
        assert cells[1] == str(m.sum()) and cells[3] == str(len(set(groups[m])))
    assert "wrote" in res.output
    quiet = CliRunner().invoke(_cli(), ["split", str(manifest), "--group", "patient_id", "--out", str(out), "-q"])
    assert quiet.exit_code == 0 and "wrote" not in quiet.output and "train" in quiet.output  # notes off, results on


def test_cli_split_multilabel_columns_and_missing_class_warning(tmp_path):
    manifest = tmp_path / "m.csv"
    rows = [[f"{i}.png", str(i % 2), "1" if i == 0 else "0", f"p{i}"] for i in range(20)]
    _write_csv(manifest, ["path", "effusion", "nodule", "patient"], rows)
    res = CliRunner().invoke(_cli(), ["split", str(manifest), "--group", "patient",
                                      "--label", "effusion,nodule", "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert "nodule" in res.output and "warning" in res.output   # one nodule: two splits lack it
    out = _read_csv(tmp_path / "o.csv")
    assert {r["split"] for r in out} == {"train", "val", "test"}


def test_cli_split_errors(tmp_path):
    manifest = tmp_path / "m.csv"
    _write_csv(manifest, ["path", "label", "patient"], [[f"{i}.png", "a", f"p{i // 2}"] for i in range(4)])
    runner, out = CliRunner(), str(tmp_path / "o.csv")
    res = runner.invoke(_cli(), ["split", str(manifest), "--group", "patient_id", "--out", out])
    assert res.exit_code != 0 and "'patient_id' is not in" in res.output and "path, label, patient" in res.output
    res = runner.invoke(_cli(), ["split", str(manifest), "--group", "patient", "--val", "0.6",
                                 "--test", "0.5", "--out", out])
    assert res.exit_code != 0 and "sum < 1" in res.output
    res = runner.invoke(_cli(), ["split", str(manifest), "--group", "patient", "--out", out])
    assert res.exit_code != 0 and "2 groups cannot fill 3 splits" in res.output and "--val 0 or --test 0" in res.output
    assert "Traceback" not in res.output


def test_cli_split_without_groups_and_with_unlabelled_rows(tmp_path):
    manifest = tmp_path / "m.csv"
    _write_csv(manifest, ["path", "label"],
               [[f"{i}.png", "" if i % 10 == 0 else ("tumour" if i % 3 == 0 else "normal")] for i in range(100)])
    res = CliRunner().invoke(_cli(), ["split", str(manifest), "--val", "0.2", "--test", "0.2",
                                      "--seed", "1", "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert "(unlabelled)" in res.output
    out = _read_csv(tmp_path / "o.csv")
    assert Counter(r["split"] for r in out) == {"train": 60, "val": 20, "test": 20}
    assert Counter(r["label"] for r in out if r["split"] == "test")[""] == 2   # 10 unlabelled, 20% of them


def test_group_ids_have_one_spelling_and_unknown_patients_stand_alone():
    """" P1", "P1 " and "P1" are one patient, 7.0 (a float id column) is 7; a row without an id
    is a patient of its own, never one giant group."""
    from featcache.splitting import grouped_split
    from featcache.store import group_id

    assert [group_id(v) for v in (" P1", "P1 ", "P1", 7, 7.0, "7", None, float("nan"), "")] == \
        ["P1", "P1", "P1", "7", "7", "7", "", "", ""]
    y = np.array([0, 1] * 30)
    spellings = ["P1", " P1", "P1 "] + [f"Q{i}" for i in range(57)]
    for seed in range(10):
        split = grouped_split(y, spellings, val=0.2, test=0.2, seed=seed)
        assert len(set(split[:3])) == 1
    unknown = [""] * 40 + [f"Q{i}" for i in range(20)]
    split = grouped_split(y, unknown, val=0.2, test=0.2, seed=0)
    assert len(set(split[:40])) == 3  # the 40 id-less rows are spread, not kept together


def test_split_groups_by_the_group_column_by_default(tmp_path):
    from featcache.splitting import split_manifest

    manifest = tmp_path / "m.csv"
    with manifest.open("w") as fh:
        fh.write("path,label,group\n")
        for p in range(60):
            for i in range(5):
                fh.write(f"p{p}_{i}.png,{p % 2},P{p}\n")
    summary = split_manifest(manifest, tmp_path / "out.csv")
    assert summary.group == "group" and not summary.leaked_groups
    import csv

    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    row_by_row = split_manifest(manifest, tmp_path / "rows.csv", group="none")
    assert row_by_row.group is None


def test_split_refuses_a_finding_column_with_a_typo(tmp_path):
    from featcache.splitting import split_manifest

    manifest = tmp_path / "m.csv"
    lines = ["path,eff,nod,mass"] + [f"{i}.png,{i % 2},{(i // 2) % 2},{int(i % 10 == 0)}" for i in range(40)]
    lines[5] = "4.png,0,0,2"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="column 'mass' holds 0/1 in 39 of 40 rows, but line 6 holds '2'"):
        split_manifest(manifest, tmp_path / "out.csv")


def test_split_reads_minus_one_as_extract_does_and_says_so(tmp_path, caplog):
    """"-1" is unlabelled for extract; split took it as a class of its own without a word."""
    manifest = tmp_path / "m.csv"
    _write_csv(manifest, ["path", "label"], [[f"{i}.png", "-1" if i % 10 == 0 else str(i % 2)] for i in range(60)])
    with caplog.at_level("WARNING", logger="featcache"):
        res = CliRunner().invoke(_cli(), ["split", str(manifest), "--out", str(tmp_path / "o.csv"), "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert "(unlabelled)" in res.output and "6 row(s) labelled '-1' are read as unlabelled" in caplog.text
