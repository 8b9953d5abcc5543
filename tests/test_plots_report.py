"""Figures, `featcache probe` and `featcache report` as a user sees them: files and printed numbers."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache_cli.main  # noqa: F401 - registers every command on the group
from featcache import plots
from featcache.report import write_report
from tests.conftest import assert_png
from featcache_cli.app import cli

CS = "1e-3,1e-2,1e-1,1"


def _assert_figure(paths: list[Path]) -> None:
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert_png(png)
    assert "<svg" in svg.read_text()[:2000]


def test_every_plot_writes_png_and_svg(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    proba = rng.dirichlet([1, 1, 1], 120)
    proba[np.arange(120), y] += 1.0
    proba /= proba.sum(1, keepdims=True)
    yb = rng.integers(0, 2, 120)
    pb = np.clip(yb * 0.4 + rng.random(120) * 0.6, 0, 1)
    _assert_figure(plots.confusion_matrix_plot([[5, 1, 0], [2, 3, 1], [0, 0, 4]], ["a", "b", "c"],
                                               tmp_path / "cm"))
    _assert_figure(plots.roc_pr_plot(y, proba, tmp_path / "roc_multi", classes=["a", "b", "c"]))
    _assert_figure(plots.roc_pr_plot(yb, np.stack([1 - pb, pb], 1), tmp_path / "roc_bin", threshold=0.4))
    _assert_figure(plots.calibration_plot(y, proba, tmp_path / "calibration"))
    _assert_figure(plots.knn_curve_plot({10: {"top1": 0.8, "top5": 0.95}, "20": {"top1": 0.82, "top5": 0.96},
                                         100: {"top1": 0.79, "top5": None}}, tmp_path / "knn"))
    rows = [{"lr": lr, "wd": wd, "val_top1": 0.5 + lr * 10 + wd} for lr in (1e-3, 1e-2) for wd in (0.0, 0.05)]
    _assert_figure(plots.sweep_heatmap_plot(rows, "lr", "wd", "val_top1", tmp_path / "sweep"))
    with pytest.raises(ValueError, match="no sweep rows"):
        plots.sweep_heatmap_plot(rows, "lr", "dropout", "val_top1", tmp_path / "bad")


def _printed_number(output: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}\s+([0-9.]+)", output, re.M)
    assert match, f"no line starting with {label!r} in:\n{output}"
    return float(match.group(1))


def test_cli_probe_prints_what_it_writes_to_json(digits_feature_file, tmp_path):
    out_json = tmp_path / "probe.json"
    res = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", CS, "--json", str(out_json),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out_json.read_text())
    assert data["kind"] == "probe" and data["selection"] == "val"
    assert f"best C: {data['best_C']:g}" in res.output
    for c, score in data["scores"].items():  # the per-C table: C, val accuracy
        assert re.search(rf"^{re.escape(c)}\s+{score:.4f}", res.output, re.M), (c, score, res.output)
    for name in ("top1", "balanced_accuracy", "macro_f1", "auroc"):
        assert _printed_number(res.output, name) == pytest.approx(data["test"][name], abs=5e-5)
    assert data["test"]["top1"] > 0.9


def test_cli_probe_without_val_split_uses_cross_validation(tmp_path, digits_arrays):
    from featcache.store import write_arrays

    path = tmp_path / "noval.h5"
    splits = {name: {"cls": x, "labels": y, "paths": [f"{name}/{i}.png" for i in range(len(y))],
                     "groups": [f"p{i // 3}" for i in range(len(y))]}
              for name, (x, y) in digits_arrays.items() if name != "val"}
    write_arrays(path, splits, [str(c) for c in range(10)], {"model": "digits-pixels"})
    res = CliRunner().invoke(cli, ["probe", str(path), "--Cs", "1e-2,1e-1", "--cv", "3"])
    assert res.exit_code == 0, res.output
    assert "cross-validation" in res.output and "3-fold CV" in res.output
    # a split named on the command line that the file lacks is a typo, not a protocol change
    for option, name in (("--val-split", "valid"), ("--test-split", "tst")):
        typo = CliRunner().invoke(cli, ["probe", str(path), "--Cs", "1e-2", "--cv", "3", option, name])
        assert typo.exit_code == 2 and f"{option} '{name}': noval.h5 has no such split (it has test, train)" \
            in typo.output, typo.output


def _fake_run(path: Path, kind: str, model: str, top1: float, auroc: float, ci: bool) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kind": kind, "model": model, "features": "cls"}))
    test = {"top1": top1, "auroc": auroc, "macro_f1": None}
    if ci:
        test["ci"] = {"top1": [top1 - 0.0123, top1 + 0.0111]}
    (path / "metrics.json").write_text(json.dumps({"kind": kind, "val": {"top1": top1 + 0.01}, "test": test}))
    return path


def test_report_puts_runs_side_by_side(digits_feature_file, tmp_path):
    a = _fake_run(tmp_path / "linear-dino", "train", "facebook/dino-vits16", 0.8765, 0.9712, ci=True)
    b = _fake_run(tmp_path / "knn-vit", "knn", "google/vit-base-patch16-224", 0.7531, 0.9345, ci=False)
    probe_dir = tmp_path / "probe-digits"
    res = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", CS, "--bootstrap", "50",
                                   "--out", str(probe_dir), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (probe_dir / "config.json").is_file()
    assert json.loads((probe_dir / "config.json").read_text())["model"] == "digits-pixels"
    for fig in ("confusion_matrix", "calibration"):
        assert_png(probe_dir / "figures" / f"{fig}.png")
        assert "<svg" in (probe_dir / "figures" / f"{fig}.svg").read_text()[:2000]
    probe_top1 = json.loads((probe_dir / "metrics.json").read_text())["test"]["top1"]

    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(a), str(b), str(probe_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    quiet = CliRunner().invoke(cli, ["report", str(a), "--out", str(tmp_path / "q"), "-q"])
    assert quiet.exit_code == 0 and quiet.output == "" and (tmp_path / "q" / "report.html").is_file()
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "linear-dino" in text and "knn-vit" in text and "probe-digits" in text
        assert "0.8765 [0.8642, 0.8876]" in text      # value with its CI
        assert "0.7531" in text and "0.9345" in text
        assert f"{probe_top1:.4f}" in text
        assert "facebook/dino-vits16" in text
    # the probe's figures are copied next to the report and linked relatively
    # (under figures/<run index>-<name>/, so names that read alike as folder names never share one)
    assert "figures/02-probe-digits/confusion_matrix.png" in md
    assert (out / "figures" / "02-probe-digits" / "confusion_matrix.png").is_file()
    assert "<img src='figures/02-probe-digits/confusion_matrix.png'" in page


def test_report_shows_the_default_c_grid_readably_and_counts_in_headings(digits_feature_file, tmp_path):
    run = tmp_path / "probe"
    res = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--out", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    config, metrics = (json.loads((run / f).read_text()) for f in ("config.json", "metrics.json"))
    assert config["Cs"][1] != 1e-05  # np.logspace's value is kept exactly on disk ...
    out = tmp_path / "report"
    assert CliRunner().invoke(cli, ["report", str(run), "--out", str(out)]).exit_code == 0
    md = (out / "report.md").read_text()
    assert "| Cs | [1e-06, 1e-05, 0.0001, " in md and "9.99999" not in md  # ... and shown as the user wrote it
    test = metrics["test"]
    assert f"### Metrics (test: {test['n']} rows, {test['num_classes']} classes)" in md
    assert "| n |" not in md and "| num\\_classes |" not in md  # counts are not listed as metrics


def test_report_refuses_a_directory_without_metrics(tmp_path):
    empty = tmp_path / "crashed-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        write_report([empty], tmp_path / "r")
    res = CliRunner().invoke(cli, ["report", str(empty), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert "crashed-run has no metrics.json" in res.output


def test_cli_probe_binary_run_dir_has_roc_pr_figure(tmp_path, digits_arrays):
    from featcache.store import write_arrays

    path = tmp_path / "binary.h5"
    splits = {name: {"cls": x, "labels": (y >= 5).astype(np.int64),
                     "paths": [f"{name}/{i}.png" for i in range(len(y))]}
              for name, (x, y) in digits_arrays.items()}
    write_arrays(path, splits, ["low", "high"], {"model": "digits-pixels"})
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["probe", str(path), "--Cs", "1e-2,1e-1", "--out", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    for fig in ("roc_pr", "confusion_matrix", "calibration"):
        _assert_figure([run / "figures" / f"{fig}.png", run / "figures" / f"{fig}.svg"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kind"] == "probe" and metrics["test"]["auroc"] > 0.9


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(digits_feature_file, tmp_path):
    """Look at the report as a person would: headless Chromium renders report.html to a PNG that
    is not blank (the comparison table and a figure were drawn)."""
    run = tmp_path / "probe"
    res = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", CS, "--out", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    write_report([run], tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={shot}", (tmp_path / "report" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10  # text, table borders and the figure: far from a blank page


def _run_dir(path: Path, metrics: dict, figure_value: int | None = None, kind: str = "train") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kind": kind, "model": "m", "features": "cls"}))
    (path / "metrics.json").write_text(json.dumps({"kind": kind, **metrics}))
    if figure_value is not None:
        from PIL import Image

        (path / "figures").mkdir()
        Image.new("L", (120, 120), figure_value).save(path / "figures" / "confusion_matrix.png")
    return path


def test_report_never_shows_one_runs_numbers_or_figures_as_anothers(tmp_path):
    """Runs named p/q and p_q keep their own figures; every clashing name is disambiguated; a
    setting is shown exactly; a repeats run is its median; an undefined metric reads n/a with its
    note; the threshold says how it was chosen; multi-label runs show their per-label table."""
    from PIL import Image

    from featcache.report import write_report

    a = _run_dir(tmp_path / "x" / "p" / "q", {"test": {"top1": 0.5}}, figure_value=10)
    b = _run_dir(tmp_path / "y" / "p" / "q", {"test": {"top1": 0.6}}, figure_value=20)
    c = _run_dir(tmp_path / "z" / "p_q", {"test": {"top1": 0.7}}, figure_value=30)
    sweep = _run_dir(tmp_path / "sweep", {"test": {"top1": 0.8}, "leaderboard": [
        {"rank": 1, "lr": 0.00125, "weight_decay": 3e-05, "val_accuracy": 0.81234}],
        "best": {"lr": 0.00125, "weight_decay": 3e-05}}, kind="sweep")
    rep = _run_dir(tmp_path / "rep", {"test": {"top1": 0.70}, "repeats": {"seeds": [0, 1, 2], "test": {
        "top1": {"median": 0.91, "std": 0.01, "values": [0.70, 0.91, 0.92]}}}})
    binary = _run_dir(tmp_path / "bin", {"positive_class": "abnormal", "threshold": {
        "rule": "youden", "value": 0.0779, "chosen_on": "val"}, "test": {
        "top1": 0.9, "auroc": None, "threshold": 0.0779, "notes": ["AUROC undefined: one class present"]}})
    multi = _run_dir(tmp_path / "ml", {"test": {"top1": 0.4, "per_label": [
        {"label": "effusion", "auroc": 0.77, "sensitivity": 0.5}, {"label": "nodule", "auroc": None,
                                                                 "sensitivity": 0.25}]}})
    out = tmp_path / "report"
    paths = write_report([a, b, c, sweep, rep, binary, multi], out)
    md = paths["md"].read_text()
    for run, value in ((a, 10), (b, 20), (c, 30)):
        names = {a: "p/q\n", b: "p/q-2\n", c: "p\\_q\n"}  # as the headings read in Markdown
        section = md.split(f"\n## {names[run]}")[1].split("\n## ")[0]
        link = section.split("![confusion matrix](")[1].split(")")[0]
        assert np.asarray(Image.open(out / link)).mean() == value  # this run's own figure
    assert "\n## p/q\n" in md and "\n## p/q-2\n" in md and "\n## q\n" not in md  # both clashing runs renamed
    assert "| 1 | 0.00125 | 3e-05 | 0.8123 |" in md                 # lr exactly, metric rounded
    assert "| best lr | 0.00125 |" in md
    page = paths["html"].read_text()
    assert "<td>test (median of 3 seeds)</td><td>n/a</td><td>n/a</td><td>0.9100</td>" in page  # not seed 0's 0.70
    assert "0.0779 (youden, chosen on validation)" in page
    assert "| auroc | n/a |" in md and "AUROC undefined: one class present" in md
    assert "### Per label" in md and "| nodule | n/a | 0.2500 |" in md
    with pytest.raises(ValueError, match="--positive-class malignant: none of these runs is a binary task"):
        write_report([a, multi], tmp_path / "r2", positive_class="malignant")  # was accepted, checking nothing


def test_knn_results_table_keeps_each_ks_interval(tmp_path):
    from featcache.report import write_report

    run = _run_dir(tmp_path / "knn", {"test": {"top1": 0.98}, "results": [
        {"k": 10, "temperature": 0.07, "top1": 0.98055, "top1_ci": [0.96659, 0.99444]},
        {"k": 20, "temperature": 0.07, "top1": 0.975, "top1_ci": [0.9611, 0.9889]}]}, kind="knn")
    md = write_report([run], tmp_path / "r")["md"].read_text()
    assert "| 10 | 0.07 | 0.9806 [0.9666, 0.9944] |" in md and "| 20 | 0.07 | 0.9750 [0.9611, 0.9889] |" in md


def test_report_lists_only_the_settings_a_head_kind_reads(digits_feature_file, tmp_path):
    """A linear head's Configuration table listed hidden 512 and dropout 0.1, which it never had."""
    import re

    import featcache as fc
    from featcache.report import write_report

    for head in ("linear", "mlp"):
        fc.train_head(digits_feature_file, head=head, epochs=1, hidden=16, dropout=0.25).save(tmp_path / head)
    write_report([tmp_path / "linear", tmp_path / "mlp"], tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text()
    sections = {h: page[page.index(f"<h2 id='{h}'>"):].split("<h2 id=")[1] for h in ("linear", "mlp")}

    def config(section: str) -> str:
        start = section.index("<h3>Configuration</h3>")
        return section[start:section.index("</table>", start)]

    assert "<td>lr</td>" in config(sections["linear"])
    assert not re.search(r"<td>(hidden|dropout)</td>", config(sections["linear"]))
    assert "<td>hidden</td><td>16</td>" in config(sections["mlp"])
    assert "<td>dropout</td><td>0.25</td>" in config(sections["mlp"])


def test_comparison_says_shared_settings_once_and_fits_the_page(tmp_path):
    """Seven descriptive columns beside nine metrics with intervals scrolled sideways and hid
    AUROC, sensitivity and specificity off the page; columns equal in every row are said once."""
    a = _fake_run(tmp_path / "lin-a", "train", "facebook/dino-vits16", 0.8765, 0.9712, ci=True)
    b = _fake_run(tmp_path / "lin-b", "train", "facebook/dino-vits16", 0.7531, 0.9345, ci=True)
    md_path = write_report([a, b], tmp_path / "report")["md"]
    md, page = md_path.read_text(), (tmp_path / "report" / "report.html").read_text()
    assert "Every run: kind train, model facebook/dino-vits16" in md.replace("\\", "")
    comparison = md.split("## Comparison")[1].split("\n## ")[0]
    header = next(line for line in comparison.splitlines() if line.startswith("| run"))
    assert "model" not in header and "top1" in header
    assert "<div class='scroll compact'>" in page and "[0.8642,&nbsp;0.8876]" in page  # breaks before [, not inside
    c = _fake_run(tmp_path / "knn-vit", "knn", "google/vit-base-patch16-224", 0.7, 0.9, ci=False)
    mixed = write_report([a, c], tmp_path / "r2")["md"].read_text().replace("\\", "")
    line = next((text for text in mixed.splitlines() if text.startswith("Every run:")), "")
    assert "model" not in line and "kind" not in line  # they differ: columns of their own


def test_a_knn_curve_without_bands_does_not_zoom_to_a_one_row_difference(tmp_path, monkeypatch):
    """Without --bootstrap the axis shrank to 0.95975..0.96125: one test row of 594 drawn as a cliff."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = []
    real_save = plots._save

    def keep_limits(fig, stem):
        limits.append(fig.axes[0].get_ylim())
        return real_save(fig, stem)

    monkeypatch.setattr(plots, "_save", keep_limits)
    plots.knn_curve_plot({10: {"top1": 571 / 594}, 200: {"top1": 570 / 594}}, tmp_path / "flat", metrics=("top1",))
    plots.knn_curve_plot({10: {"top1": 1.0}, 20: {"top1": 0.999}}, tmp_path / "top", metrics=("top1",))
    plots.knn_curve_plot({10: {"top1": 0.2}, 20: {"top1": 0.9}}, tmp_path / "wide", metrics=("top1",))
    (lo, hi), (lo2, hi2), (lo3, hi3) = limits
    assert hi - lo >= plots.KNN_MIN_SPAN - 1e-12 and lo < 570 / 594 < 571 / 594 < hi
    assert hi2 == 1.0 and hi2 - lo2 >= plots.KNN_MIN_SPAN - 1e-12   # kept within 0..1
    assert lo3 < 0.2 and hi3 > 0.9 and hi3 - lo3 < 0.9   # a real spread keeps matplotlib's own range
    plt.close("all")


def test_the_html_comparison_keeps_every_metric_on_the_page():
    """16 columns scrolled sideways at 1400 px: specificity, mcc and ece of every run were hidden;
    a table of short numbers that fits stays one table."""
    from featcache.report import HTML_TABLE_CHARS, _column_chars, column_groups

    header = ["run", "kind", "model", "features", "split", "positive class", "threshold", "top1", "balanced_accuracy",
              "macro_f1", "auroc", "auprc", "sensitivity", "specificity", "mcc", "ece"]
    rows = [["r1", "probe", "medA", "cls", "test", "malignant", "0.5000 (the default)"]
            + ["0.9562 [0.9312, 0.9724]"] * 6 + ["0.9819 [0.9652, 0.9907]", "0.6456", "0.0162"]] * 2
    assert _column_chars("balanced_accuracy", ["0.8005 [0.7225, 0.8846]"]) == len("[0.7225, 0.8846]") + 2
    groups = column_groups(header, rows)
    assert len(groups) >= 2 and all(h[0] == "run" for h, _ in groups)
    assert all(sum(_column_chars(c, [r[i] for r in rs]) for i, c in enumerate(h)) <= HTML_TABLE_CHARS
               for h, rs in groups)
    assert [c for h, _ in groups for c in h if c != "run"] == header[1:]       # every column once, in order
    plain = [["knn", "knn", "cls", "0.5000", "0.8528", "0.5147", "0.4906", "0.8434", "0.5492", "0.4536", "0.0859"]]
    names = ["run", "kind", "features", "top1", "top5", "balanced_accuracy", "macro_f1", "auroc", "auprc", "mcc", "ece"]
    assert column_groups(names, plain) == [(names, plain)]   # the demo's table: one table, as it fits


def test_the_configuration_says_which_positive_class_a_default_resolved_to():
    """'positive_class none' stood above metrics that named malignant the positive class."""
    from featcache.report import _config_rows

    assert ("positive_class", "default (malignant)") in _config_rows({"positive_class": None}, "malignant")
    assert ("positive_class", "none") in _config_rows({"positive_class": None})   # a multiclass run: none
    assert ("positive_class", "benign") in _config_rows({"positive_class": "benign"}, "benign")
