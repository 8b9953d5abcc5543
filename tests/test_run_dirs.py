"""Run directories as files on disk: replaced whole, never mixed; outputs that would destroy a feature
file or a run refused before any work; damaged or mixed heads refused by predict."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import featcache as fc
from featcache.runs import write_run
from featcache.store import write_arrays
from featcache_cli.main import cli


@pytest.fixture()
def small(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    x = (rng.normal(size=(120, 4)) + y[:, None]).astype(np.float32)
    path = tmp_path / "f.h5"
    write_arrays(path, {"train": {"cls": x[:80], "labels": y[:80]}, "val": {"cls": x[80:100], "labels": y[80:100]},
                        "test": {"cls": x[100:], "labels": y[100:]}}, ["a", "b"], {"model": "m"}).close()
    return path


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_run_replaces_an_earlier_run_whole(small, tmp_path):
    """knn into a train run's directory kept the train head, history and figures beside the knn metrics:
    predict then applied the old head to a 'knn' run, and the report showed its learning curve."""
    run = tmp_path / "run"
    assert _run("train", small, "--epochs", "2", "--out", run, "-q").exit_code == 0
    assert (run / "head.safetensors").exists() and (run / "history.json").exists()
    assert _run("knn", small, "--k", "5", "--out", run, "-q").exit_code == 0
    assert not (run / "head.safetensors").exists() and not (run / "history.json").exists()
    assert json.loads((run / "metrics.json").read_text())["kind"] == "knn"
    assert not (run / "figures" / "learning_curve.png").exists()
    r = _run("predict", run, small, "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and "holds no saved head" in r.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []  # nothing left aside
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes((run / "metrics.json").read_bytes())
    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(elsewhere, target_is_directory=True)  # a figures folder pointing outside the run
    assert fc.load_run(run).figures == []


def test_an_interrupted_write_reads_as_unfinished_never_as_a_mix(small, tmp_path):
    """A kill while drawing figures left a new config and head beside the old run's metrics.json, which
    report and predict took for a finished run."""
    run = tmp_path / "run"
    assert _run("train", small, "--epochs", "2", "--out", run, "-q").exit_code == 0

    def broken(fig_dir):
        raise RuntimeError("killed while drawing")

    with pytest.raises(RuntimeError):
        write_run(run, {"kind": "knn"}, {"test": {}}, figures=broken)
    assert not (run / "metrics.json").exists() and not (run / "head.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="not a finished run directory"):
        fc.load_run(run)
    assert _run("knn", small, "--k", "5", "--out", run, "-q").exit_code == 0  # a re-run finishes it
    assert fc.load_run(run).kind == "knn"


def test_other_files_in_a_run_directory_are_kept_and_writers_take_turns(small, tmp_path):
    """Replacing a run removes only featcache's own files: a --json summary written inside RUN, notes and
    the very feature file the run reads stay. A second writer is refused while the first writes."""
    import os

    run = tmp_path / "run"
    run.mkdir()
    (run / "NOTES.md").write_text("keep me")
    feats = run / "feats.h5"
    shutil.copy(small, feats)
    for _ in range(2):
        r = _run("knn", feats, "--k", "5", "--out", run, "--json", run / "summary.json", "-q")
        assert r.exit_code == 0, r.output
    assert {"NOTES.md", "feats.h5", "summary.json", "metrics.json", "config.json"} <= {p.name for p in run.iterdir()}
    assert (run / "NOTES.md").read_text() == "keep me" and feats.read_bytes() == small.read_bytes()
    (run / ".featcache-writing").write_text(str(os.getpid()))  # this process: alive, writing
    with pytest.raises(ValueError, match=r"another process \(pid \d+\) is writing the run directory"):
        write_run(run, {"kind": "knn"}, {"test": {}})
    (run / ".featcache-writing").write_text("999999999")  # a killed writer's lock is taken over
    write_run(run, {"kind": "knn"}, {"test": {}})
    assert not (run / ".featcache-writing").exists()


def test_outputs_that_would_destroy_data_are_refused_before_any_work(small, tmp_path):
    """predict --out feats.h5 overwrote the feature file with a CSV (exit 0); --json onto the feature file
    or a run's metrics.json replaced them; a CSV through a symlink must reach the linked file."""
    run = tmp_path / "run"
    assert _run("train", small, "--epochs", "2", "--out", run, "-q").exit_code == 0
    feature_bytes = small.read_bytes()
    r = _run("predict", run, small, "--out", small)
    assert r.exit_code == 2 and "is an HDF5 file" in r.output
    r = _run("knn", small, "--json", small)
    assert r.exit_code == 2 and "is an HDF5 file" in r.output
    r = _run("knn", small, "--json", run / "metrics.json")
    assert r.exit_code == 2 and "is a file of the run directory" in r.output
    assert small.read_bytes() == feature_bytes
    results = tmp_path / "results"
    results.mkdir()
    assert _run("knn", small, "--k", "5", "--json", results / "metrics.json", "-q").exit_code == 0  # not a run dir
    (tmp_path / "shared.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to(tmp_path / "shared.csv")
    r = _run("predict", run, small, "--out", tmp_path / "link.csv")
    assert r.exit_code == 0 and (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "shared.csv").read_text().startswith("image_path,probability")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_directory_of_someone_elses_files_is_not_taken_for_a_run(small, tmp_path):
    """knn --out proj, where proj held the user's own figures/ and config.json: both deleted, exit 0."""
    proj = tmp_path / "proj"
    (proj / "figures").mkdir(parents=True)
    (proj / "figures" / "my_plot.png").write_text("precious")
    (proj / "config.json").write_text('{"mine": 1}')
    for cmd in (["knn", small, "--k", "5"], ["probe", small, "--Cs", "1"], ["train", small, "--epochs", "1"]):
        r = _run(*cmd, "--out", proj, "-q")
        assert r.exit_code == 2 and "holds config.json, figures/ but is not a featcache run directory" in r.output, \
            r.output
    assert (proj / "figures" / "my_plot.png").read_text() == "precious"
    assert (proj / "config.json").read_text() == '{"mine": 1}'
    with pytest.raises(ValueError, match="not a featcache run directory"):
        write_run(proj, {"kind": "knn"}, {"test": {}})
    # an earlier run (finished, or killed with only its config written) is replaced as before
    (proj / "config.json").write_text('{"kind": "train"}')
    assert _run("knn", small, "--k", "5", "--out", proj, "-q").exit_code == 0
    assert not (proj / "figures" / "my_plot.png").exists()


def test_a_run_stopped_while_clearing_the_last_one_can_be_run_again(small, tmp_path, monkeypatch):
    """Ctrl-C while the earlier run's figures/ were removed left figures/ alone (config.json gone,
    the lock released), and the re-run the README advises was refused as not a run directory."""
    import shutil as shutil_module

    run = tmp_path / "run"
    assert _run("train", small, "--epochs", "2", "--out", run, "-q").exit_code == 0

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil_module, "rmtree", stopped)
        with pytest.raises(KeyboardInterrupt):
            write_run(run, {"kind": "knn"}, {"test": {}})
    assert not (run / "metrics.json").exists() and (run / "figures").is_dir()
    r = _run("knn", small, "--k", "5", "--out", run, "-q")
    assert r.exit_code == 0, r.output
    assert fc.load_run(run).kind == "knn"


def test_predict_refuses_damaged_or_mixed_heads(small, tmp_path):
    """A head.json of another run beside these weights, a class list of the wrong length, a zero std, a
    missing key and a run without metrics.json were applied (or gave tracebacks)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    assert _run("train", small, "--epochs", "2", "--out", run, "-q").exit_code == 0
    probe = tmp_path / "probe"
    assert _run("probe", small, "--Cs", "1", "--out", probe, "-q").exit_code == 0

    def damaged(name, edit_meta=None, edit_tensors=None, drop=None):
        d = tmp_path / name
        shutil.copytree(run, d)
        if edit_meta:
            meta = json.loads((d / "head.json").read_text())
            edit_meta(meta)
            (d / "head.json").write_text(json.dumps(meta))
        if edit_tensors:
            tensors = load_file(str(d / "head.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(d / "head.safetensors"))
            meta = json.loads((d / "head.json").read_text())
            import hashlib

            meta["weights_sha256"] = hashlib.sha256((d / "head.safetensors").read_bytes()).hexdigest()
            (d / "head.json").write_text(json.dumps(meta))
        if drop:
            (d / drop).unlink()
        return d

    mixed = damaged("mixed")
    shutil.copy(probe / "head.json", mixed / "head.json")
    cases = {
        mixed: "is not the file",
        damaged("classes", edit_meta=lambda m: m.update(classes=["a", "b", "c"])): "scores 2 classes but names 3",
        damaged("zero_std", edit_tensors=lambda t: t.update({"standardize.std": t["standardize.std"] * 0})):
            "a std that is not positive",
        damaged("no_mean", edit_tensors=lambda t: [t.pop("standardize.mean"), t.pop("standardize.std")]):
            r"standardisation \(mean and std\) is missing",
        damaged("no_key", edit_meta=lambda m: m.pop("features")): "lacks features",
        damaged("unfinished", drop="metrics.json"): "not a finished run",
    }
    for d, message in cases.items():
        with pytest.raises(ValueError, match=message):
            fc.predict(d, small)
    assert fc.predict(run, small).proba.shape == (20, 2)
