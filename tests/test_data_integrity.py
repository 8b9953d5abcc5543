"""Rows that could silently get the wrong label, group or features (a review of 2026-12-01): each
test pins one case, checked against what the files on disk say."""
from __future__ import annotations

import csv
import shutil
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache.sources import discover
from featcache.splitting import split_manifest
from featcache_cli.main import cli


def _images(root: Path, names: list[str], seed: int = 0, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)).save(root / name)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------

def test_multilabel_manifest_from_split_keeps_its_labels(tmp_path):
    names = [f"img/{i}.png" for i in range(24)]
    _images(tmp_path, names)
    rows = [[n, f"p{i // 2}", i % 2, int(i % 3 == 0)] for i, n in enumerate(names)]
    manifest = _write_csv(tmp_path / "m.csv", ["path", "patient_id", "effusion", "nodule"], rows)
    split_manifest(manifest, tmp_path / "split.csv", group="patient_id", label="effusion,nodule")
    src = discover(tmp_path / "split.csv")
    assert src.multilabel and src.classes == ["effusion", "nodule"]  # patient_id is not a finding
    truth = {n: [e, d] for n, _, e, d in rows}
    for spec in src.splits.values():
        assert [truth[p] for p in spec.paths] == spec.labels.tolist()
        assert all(g for g in spec.groups)


def test_manifest_without_a_label_column_is_an_error_not_unlabelled_rows(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    manifest = _write_csv(tmp_path / "m.csv", ["path", "diagnosis"], [["a.png", "normal"], ["b.png", "pneumonia"]])
    with pytest.raises(ValueError, match="--label-column NAME"):
        discover(manifest)
    src = discover(manifest, label_column="diagnosis")
    assert src.classes == ["normal", "pneumonia"]
    # a manifest of unlabelled images (path only) stays unlabelled
    assert discover(_write_csv(tmp_path / "u.csv", ["path"], [["a.png"], ["b.png"]])).classes == []


def test_split_reads_float_zero_one_cells_as_extract_does(tmp_path):
    rows = [[f"{i}.png", f"p{i}", "1.0" if i % 2 else "0.0", "0.0" if i % 3 else "1.0"] for i in range(30)]
    manifest = _write_csv(tmp_path / "m.csv", ["path", "patient", "eff", "nod"], rows)
    summary = split_manifest(manifest, tmp_path / "s.csv", group="patient", label="eff,nod")
    assert summary is not None
    out = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["eff"] for r in out] == [r[2] for r in rows]


def test_split_refuses_a_manifest_whose_group_column_is_another_grouping(tmp_path):
    rows = [[f"{i}.png", "a" if i % 2 else "b", f"p{i // 2}", f"site{i % 3}"] for i in range(30)]
    manifest = _write_csv(tmp_path / "m.csv", ["path", "label", "patient_id", "group"], rows)
    with pytest.raises(ValueError, match="already has a 'group' column"):
        split_manifest(manifest, tmp_path / "s.csv", group="patient_id")


# ------------------------------------------------------------------------------------------------
# resume and update
# ------------------------------------------------------------------------------------------------

def test_a_split_gone_from_the_data_is_refused_on_a_plain_rerun(tiny_vit, tmp_path):
    data = tmp_path / "data"
    _images(data, [f"{s}/{c}/{i}.png" for s in ("train", "val") for c in "ab" for i in range(3)])
    out = tmp_path / "f.h5"
    fc.extract(str(tiny_vit), data, out, workers=0).close()
    shutil.rmtree(data / "val")
    with pytest.raises(ValueError, match=r"split\(s\) val that the data no longer has.*--update"):
        fc.extract(str(tiny_vit), data, out, workers=0)
    with fc.extract(str(tiny_vit), data, out, workers=0, update=True) as store:
        assert store.splits == ["train"]


def test_same_named_images_in_another_folder_are_not_given_the_old_features(tiny_vit, tmp_path):
    names = [f"{c}/{i}.png" for c in "ab" for i in range(3)]
    _images(tmp_path / "site1", names, seed=1)
    _images(tmp_path / "site2", names, seed=2)          # the same file names, other pixels
    out = tmp_path / "f.h5"
    fc.extract(str(tiny_vit), tmp_path / "site1", out, workers=0).close()
    for update in (False, True):
        with pytest.raises(ValueError, match="holds features of the images under .*site1.*reads .*site2"):
            fc.extract(str(tiny_vit), tmp_path / "site2", out, workers=0, update=update)


def test_a_refused_resume_says_which_setting_differs(tiny_vit, tmp_path):
    _images(tmp_path / "d", ["a/0.png", "b/0.png"])
    out = tmp_path / "f.h5"
    fc.extract(str(tiny_vit), tmp_path / "d", out, workers=0).close()
    with pytest.raises(ValueError, match=r"they differ in: .*fast_decode \(absent -> true\)"):
        fc.extract(str(tiny_vit), tmp_path / "d", out, workers=0, fast_decode=True)
    # only what changed is listed: the processor settings read back from the file (JSON lists) are
    # the same as the run's (tuples), and a nested setting is named by its dotted key
    with pytest.raises(ValueError) as refused:
        fc.extract(str(tiny_vit), tmp_path / "d", out, workers=0, dtype="float32")
    assert refused.value.args[0].split("they differ in: ")[1].startswith('dtype ("float16" -> "float32").')


# ------------------------------------------------------------------------------------------------
# extraction settings
# ------------------------------------------------------------------------------------------------

def test_image_size_on_a_convnext_processor_gives_its_own_recipe(tiny_models, tmp_path):
    from transformers import AutoModel, ConvNextImageProcessor

    _images(tmp_path / "d", ["a/0.png", "a/1.png", "b/0.png"], size=70)
    with fc.extract(str(tiny_models["resnet"]), tmp_path / "d", tmp_path / "r.h5", workers=0, image_size=48,
                    dtype="float32") as store:
        cls, paths = store["all"].cls[()], store["all"].paths
        assert store.config["input_size"] == [48, 48]
    model = AutoModel.from_pretrained(tiny_models["resnet"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: PIL backend without torchvision
        proc = ConvNextImageProcessor(size={"shortest_edge": 48})  # short side 48 / 0.875, centre crop 48
    for row, p in zip(cls, paths):
        x = torch.as_tensor(np.asarray(proc(images=Image.open(tmp_path / "d" / p).convert("RGB"),
                                            return_tensors="np")["pixel_values"]))
        with torch.no_grad():
            ref = model(pixel_values=x).pooler_output.flatten(1)[0].numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5)  # float32 conv batched vs alone


def test_a_run_where_every_image_fails_is_an_error(tiny_vit, tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "d" / "a" / f"{i}.png").write_bytes(b"not a png at all")
    res = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "d"),
                                   "--out", str(tmp_path / "f.h5"), "--workers", "0"])
    assert res.exit_code != 0
    assert "every one of the 3 images failed" in res.output


def test_image_size_on_a_fixed_size_vit_names_the_native_mode(tiny_vit, tmp_path):
    _images(tmp_path / "d", ["a/0.png"])
    with pytest.raises(ValueError, match="--token-mode native"):
        fc.extract(str(tiny_vit), tmp_path / "d", tmp_path / "f.h5", workers=0, image_size=48)


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_is_run_in_float32(tiny_models, tmp_path, saved):
    """transformers 5 loads a checkpoint in the dtype it was saved in: features of a bfloat16
    checkpoint were computed in bfloat16 (1e-2 off a float32 forward of the same weights) while the
    file said float32."""
    from transformers import AutoImageProcessor, AutoModel

    AutoModel.from_pretrained(tiny_models["vit"]).to(saved).save_pretrained(tmp_path / "half")
    AutoImageProcessor.from_pretrained(tiny_models["vit"]).save_pretrained(tmp_path / "half")
    _images(tmp_path / "d", ["a/0.png", "a/1.png", "b/0.png"])
    with fc.extract(str(tmp_path / "half"), tmp_path / "d", tmp_path / "f.h5", workers=0, dtype="float32") as store:
        cls, paths = store["all"].cls[()], store["all"].paths
    model = AutoModel.from_pretrained(tmp_path / "half").float().eval()  # the same weights, in float32
    proc = AutoImageProcessor.from_pretrained(tmp_path / "half")
    for row, p in zip(cls, paths):
        x = torch.as_tensor(np.asarray(proc(images=Image.open(tmp_path / "d" / p).convert("RGB"),
                                            return_tensors="np")["pixel_values"]))
        with torch.no_grad():
            ref = model(pixel_values=x).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5)  # float32 batched vs alone


def test_image_size_must_be_positive_and_a_patch_multiple(tiny_models, tmp_path):
    """0 was silently the processor's own size (recorded as 0), -14 a traceback, 30 on a patch-4
    DINOv2 dropped the last 2 px rows and columns of every image without a word (now a warning:
    files made at such a size before must still resume)."""
    _images(tmp_path / "d", ["a/0.png"])
    model = str(tiny_models["dinov2"])
    with pytest.warns(UserWarning, match=r"--image-size 30 is not a multiple of .* patch size 4 \(the model "
                                         r"sees 28 px; the last pixels of each side are dropped\); use 28 or 32"):
        fc.extract(model, tmp_path / "d", tmp_path / "kept.h5", workers=0, image_size=30).close()
    for size in (0, -14):
        with pytest.raises(ValueError, match="--image-size must be a positive number of pixels"):
            fc.extract(model, tmp_path / "d", tmp_path / "f.h5", workers=0, image_size=size)
        res = CliRunner().invoke(cli, ["extract", "--model", model, "--data", str(tmp_path / "d"),
                                       "--out", str(tmp_path / "f.h5"), f"--image-size={size}"])
        assert res.exit_code == 2 and "Traceback" not in res.output and "--image-size" in res.output
    assert not (tmp_path / "f.h5").exists() and (tmp_path / "kept.h5").exists()


def test_resize_mode_warns_when_it_shrinks_the_token_count(tiny_vit, tmp_path):
    _images(tmp_path / "d", ["a/0.png", "b/0.png"])
    with pytest.warns(UserWarning, match="token 0 is then a blend of CLS"):
        store = fc.extract(str(tiny_vit), tmp_path / "d", tmp_path / "f.h5", workers=0, tokens="full",
                           num_tokens=40, token_mode="resize", dtype="float32")
    with store:
        tokens, cls = store["all"].tokens[()], store["all"].cls[()]
    assert tokens.shape[1] == 40
    assert not np.allclose(tokens[:, 0], cls)  # what the warning says
    # the command line prints it as one line, not Python's "file.py:N: UserWarning" and code line
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "featcache", "extract", "-m", str(tiny_vit), "-d", str(tmp_path / "d"),
                          "-o", str(tmp_path / "g.h5"), "--workers", "0", "--tokens", "full", "--num-tokens", "40",
                          "--token-mode", "resize", "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "token 0 is then" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: --token-mode resize from 65 down to 40 tokens")
    assert "UserWarning" not in res.stderr and "plan_tokens(" not in res.stderr


def test_a_manifest_listing_one_image_twice_is_refused(tmp_path):
    _images(tmp_path, ["im01.png", "im02.png"])
    manifest = _write_csv(tmp_path / "m.csv", ["path", "label", "split"],
                          [["im01.png", "a", "train"], ["im02.png", "b", "train"], ["./im01.png", "a", "test"]])
    with pytest.raises(ValueError, match=r"lists './im01.png' twice \(lines 2 and 4\)"):
        discover(manifest)


def test_write_arrays_refuses_misaligned_or_non_binary_arrays(tmp_path):
    from featcache.importing import import_features
    from featcache.store import write_arrays

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"pooled must be \(6, 8\), one row per cls row"):
        write_arrays(tmp_path / "a.h5", {"train": {"cls": x, "pooled": np.zeros((9, 8), np.float32),
                                                   "labels": np.zeros(6, int)}}, ["a"], {"model": "m"})
    y = np.array([[0, 1], [1, 0.7], [0, 0], [1, 1], [0, 0], [1, 0]])
    np.savez(tmp_path / "t.npz", features=x, labels=y)
    with pytest.raises(ValueError, match="must be 0 or 1; found 0.7"):
        import_features(tmp_path / "b.h5", {"train": tmp_path / "t.npz"}, classes="eff,nod")
    with pytest.raises(ValueError, match="2 columns but 3 label names"):
        write_arrays(tmp_path / "c.h5", {"train": {"cls": x, "labels": (y >= 0.5).astype(np.uint8)}},
                     ["eff", "nod", "mass"], {"model": "m"})


# ------------------------------------------------------------------------------------------------
# import: labels and arrays as other tools save them
# ------------------------------------------------------------------------------------------------

def _import(tmp_path, *args):
    return CliRunner().invoke(cli, ["import", "--out", str(tmp_path / "o.h5"), "--overwrite", *map(str, args)])


def test_import_reads_labels_as_other_tools_save_them(tmp_path):
    """(N, 1) 0/1 labels were a one-finding multi-label task; float labels became text classes in
    the order 0.0, 1.0, 10.0, 2.0; '-1' among class names was a class; bf16 tensors and a labels-only
    .pt/.npz crashed or were refused."""
    import torch

    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cases = {
        "column.npy": (np.array([[0], [1], [1], [0], [1], [0]]), ["0", "1"], [0, 1, 1, 0, 1, 0]),
        "float.npy": (np.array([0.0, 2.0, 10.0, 1.0, 2.0, np.nan]), [str(i) for i in range(11)], [0, 2, 10, 1, 2, -1]),
        "names.txt": ("dog\n-1\ncat\ndog\ncat\n-1\n", ["cat", "dog"], [1, -1, 0, 1, 0, -1]),
        "labels.npz": ({"labels": np.array([1, 0, 1, 0, 1, 0])}, ["0", "1"], [1, 0, 1, 0, 1, 0]),
        "labels.pt": ({"labels": torch.tensor([1, 0, 1, 0, 1, 0])}, ["0", "1"], [1, 0, 1, 0, 1, 0]),
    }
    for name, (value, classes, expected) in cases.items():
        f = tmp_path / name
        if name.endswith(".txt"):
            f.write_text(value)
        elif name.endswith(".npz"):
            np.savez(f, **value)
        elif name.endswith(".pt"):
            torch.save(value, f)
        else:
            np.save(f, value)
        r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={f}")
        assert r.exit_code == 0, (name, r.output)
        with fc.open(tmp_path / "o.h5") as store:
            assert not store.multilabel and store.classes == classes, name
            assert store["train"].labels.tolist() == expected, name
    torch.save({"features": torch.as_tensor(x).bfloat16(), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}, tmp_path / "b.pt")
    r = _import(tmp_path, "--split", f"train={tmp_path / 'b.pt'}")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:
        np.testing.assert_array_equal(store["train"].cls[()], torch.as_tensor(x).bfloat16().float().numpy())


def test_import_refuses_what_it_would_store_wrongly(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    np.savez(tmp_path / "with_pooled.npz", cls=x, pooled=x * 2, labels=np.arange(6) % 2)
    np.savez(tmp_path / "plain.npz", cls=x, labels=np.arange(6) % 2)
    np.savez(tmp_path / "tok4.npz", cls=x, tokens=rng.normal(size=(6, 4, 4)).astype(np.float32))
    np.savez(tmp_path / "tok7.npz", cls=x, tokens=rng.normal(size=(6, 7, 4)).astype(np.float32))
    torch.save({"features": x, "labels": np.arange(6)}, tmp_path / "numpy_inside.pt")
    np.save(tmp_path / "half.npy", np.array([0.5, 1, 0, 1, 0, 1]))
    np.save(tmp_path / "minus2.npy", np.array([0, 1, -2, 1, 0, 1]))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "paths.txt").write_text("a.png\nb.png\na.png\nc.png\nd.png\ne.png\n")
    for args, message in [
        (["--split", f"train={tmp_path / 'with_pooled.npz'}", "--split", f"test={tmp_path / 'plain.npz'}"],
         "split 'test' has no pooled, but split 'train' has"),
        (["--split", f"train={tmp_path / 'plain.npz'}", "--split", f"test={tmp_path / 'with_pooled.npz'}"],
         "split 'test' has pooled, but split 'train' has none"),
        (["--split", f"train={tmp_path / 'tok4.npz'}", "--split", f"test={tmp_path / 'tok7.npz'}"],
         r"tokens must be \(6, 4, 4\)"),
        (["--split", f"train={tmp_path / 'numpy_inside.pt'}"], "holds objects other than tensors"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'half.npy'}"],
         "labels hold 0.5, which is not a class index"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'minus2.npy'}"],
         "label -2 is not a class index"),
        (["--split", f"train={tmp_path / 'plain.npz'}", "--classes", str(tmp_path / "clases.txt")], "no such file"),
        (["--split", f"train={tmp_path / 'plain.npz'}", "--classes", "a,a"], "names a more than once"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--paths", f"train={tmp_path / 'paths.txt'}"],
         "path 'a.png' is given twice"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--split", f"train={tmp_path / 'plain.npz'}"],
         "split 'train' is given twice"),
    ]:
        r = _import(tmp_path, *args)
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output)
        assert re.search(message, " ".join(r.output.split())), (message, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)


def test_import_of_what_a_second_review_found_stored_wrongly_or_crashed(tmp_path):
    """np.savetxt labels (0.000e+00 ...) became class names sorted as text with '-1.0' a class; an
    inf label became unlabelled; 'tr/ain' as a split name left a file no reader opens; 'classes' gave
    an HDF5 error; 1e39 was called a NaN; 1e-8 rows were stored in float16 as zero rows; --out equal
    to an input destroyed it; an empty --model was recorded."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "y.txt", np.array([0, 1, 2, 10, -1, 1], dtype=float))
    (tmp_path / "b.txt").write_text("True\nFalse\ntrue\nFalse\nTrue\nfalse\n")
    for labels, classes, expected in (("y.txt", [str(i) for i in range(11)], [0, 1, 2, 10, -1, 1]),
                                      ("b.txt", ["0", "1"], [1, 0, 1, 0, 1, 0])):
        r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / labels}")
        assert r.exit_code == 0, r.output
        with fc.open(tmp_path / "o.h5") as store:
            assert store.classes == classes and store["train"].labels.tolist() == expected, labels
    np.savetxt(tmp_path / "two.txt", np.array([0, 1, 0, 1, 0, 1], dtype=float))
    r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'two.txt'}",
                "--classes", "normal,pneumonia")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:
        assert store.classes == ["normal", "pneumonia"] and store["train"].labels.tolist() == [0, 1, 0, 1, 0, 1]
    # numbers that are names: grades with fractions, and texts --classes names (not indices into it)
    (tmp_path / "grades.txt").write_text("2.5\n3.5\n2.5\n4.5\n3.5\n2.5\n")
    (tmp_path / "named.txt").write_text("1.0\n0.0\n1.0\n1.0\n0.0\n0.0\n")
    for labels, extra, classes, expected in (("grades.txt", [], ["2.5", "3.5", "4.5"], [0, 1, 0, 2, 1, 0]),
                                             ("named.txt", ["--classes", "1.0,0.0"], ["1.0", "0.0"],
                                              [0, 1, 0, 0, 1, 1])):
        r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / labels}",
                    *extra)
        assert r.exit_code == 0, r.output
        with fc.open(tmp_path / "o.h5") as store:
            assert store.classes == classes and store["train"].labels.tolist() == expected, labels
    np.save(tmp_path / "inf.npy", np.array([0, 1, np.inf, 1, 0, 1]))
    np.savez(tmp_path / "nolabels.npz", other=np.arange(6))
    np.savez(tmp_path / "big.npz", cls=np.where(np.arange(24).reshape(6, 4) == 5, 1e39, x.astype(np.float64)))
    np.savez(tmp_path / "bigpool.npz", cls=x, pooled=np.full((6, 4), 1e39))
    np.save(tmp_path / "tiny.npy", x * 1e-8)
    for args, message in [
        (["--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'inf.npy'}"],
         "labels hold inf, which is not a class index"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'nolabels.npz'}"],
         "nolabels.npz has no labels: expected an array named one of labels"),
        (["--split", f"tr/ain={tmp_path / 'x.npy'}"], "split name 'tr/ain' holds '/'"),
        (["--split", f"classes={tmp_path / 'x.npy'}"], "split name 'classes' is reserved"),
        (["--split", f"train={tmp_path / 'big.npz'}"], r"cls reaches 1e\+39, beyond float32's largest value"),
        (["--split", f"train={tmp_path / 'bigpool.npz'}"], r"pooled reaches 1e\+39, beyond float32's largest value"),
        (["--split", f"train={tmp_path / 'tiny.npy'}", "--dtype", "float16"],
         r"6 row\(s\) of cls features in split 'train' are nonzero but every value is below float16's smallest"),
        (["--split", f"train={tmp_path / 'x.npy'}", "--model", " "], "--model is empty"),
    ]:
        r = _import(tmp_path, *args)
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output)
        assert re.search(message, " ".join(r.output.split())), (message, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
    assert _import(tmp_path, "--split", f"train={tmp_path / 'tiny.npy'}").exit_code == 0   # float32 keeps them
    before = (tmp_path / "x.npy").read_bytes()
    r = CliRunner().invoke(cli, ["import", "--out", str(tmp_path / "x.npy"), "--overwrite", "--split",
                                 f"train={tmp_path / 'x.npy'}"])
    assert r.exit_code != 0 and "is one of the inputs" in r.output and (tmp_path / "x.npy").read_bytes() == before


def test_token_and_size_options_that_contradict_are_refused_plainly(tiny_models, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    _images(tmp_path / "d", ["a/0.png", "b/0.png"])
    vit = str(tiny_models["vit"])
    with pytest.raises(ValueError, match="--image-size and --token-mode native both set the input size"):
        fc.extract(vit, tmp_path / "d", tmp_path / "f.h5", workers=0, tokens="full", num_tokens=65,
                   token_mode="native", image_size=40)
    wide = tmp_path / "wide"  # a ViT trained at 32 x 48: transformers cannot interpolate its grid
    ViTModel(ViTConfig(image_size=(32, 48), patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)).save_pretrained(wide)
    ViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(wide)
    with pytest.raises(ValueError, match="square trained grid only; .* trained at 32x48 px"):
        fc.extract(str(wide), tmp_path / "d", tmp_path / "g.h5", workers=0, tokens="full", num_tokens=101,
                   token_mode="native")
    with pytest.raises(ValueError, match="workers must be 0 .* or more; got -1"):
        fc.extract(vit, tmp_path / "d", tmp_path / "h.h5", workers=-1)
    assert not any((tmp_path / n).exists() for n in ("f.h5", "g.h5", "h.h5"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CNN has no CLS token to blend: no such warning
        fc.extract(str(tiny_models["resnet"]), tmp_path / "d", tmp_path / "r.h5", workers=0, tokens="full",
                   num_tokens=10, token_mode="resize").close()


def test_image_size_turns_on_a_processor_saved_without_resizing(tiny_models, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    AutoModel.from_pretrained(tiny_models["vit"]).save_pretrained(tmp_path / "m")
    proc = AutoImageProcessor.from_pretrained(tiny_models["vit"])
    proc.do_resize = False
    proc.save_pretrained(tmp_path / "m")
    _images(tmp_path / "d", ["a/0.png", "b/0.png"], size=70)
    with fc.extract(str(tmp_path / "m"), tmp_path / "d", tmp_path / "f.h5", workers=0, image_size=32) as store:
        assert store.config["input_size"] == [32, 32] and store["all"].done.all()


def test_import_labels_groups_and_files_as_people_write_them(tmp_path):
    """None among labels became a class "None", a BOM a phantom class, groups of another length a
    broken or misaligned file; a refused --overwrite deleted the good file; a tuple .pt was numpy's
    'inhomogeneous shape'."""
    import torch

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    torch.save({"features": torch.as_tensor(x), "labels": [0, 1, None, 1]}, tmp_path / "none_int.pt")
    torch.save({"features": torch.as_tensor(x), "labels": ["cat", " dog", None, "cat"]}, tmp_path / "none_str.pt")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "bom.txt").write_text("\ufeff2\n0\n1\n2\n", encoding="utf-8")
    (tmp_path / "names.txt").write_text("\ufeffdog\ncat\ndog\ncat\n", encoding="utf-8")
    (tmp_path / "classes.txt").write_text("\ufeffcat\ndog\n", encoding="utf-8")
    for args, classes, labels in [
        ([f"train={tmp_path / 'none_int.pt'}"], ["0", "1"], [0, 1, -1, 1]),
        ([f"train={tmp_path / 'none_str.pt'}"], ["cat", "dog"], [0, 1, -1, 0]),
        ([f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'bom.txt'}"], ["0", "1", "2"], [2, 0, 1, 2]),
        ([f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'names.txt'}", "--classes",
          str(tmp_path / "classes.txt")], ["cat", "dog"], [1, 0, 1, 0]),
    ]:
        r = _import(tmp_path, "--split", *args)
        assert r.exit_code == 0, (args, r.output)
        with fc.open(tmp_path / "o.h5") as store:
            assert store.classes == classes and store["train"].labels.tolist() == labels, args
    good = tmp_path / "o.h5"
    before = good.read_bytes()
    np.save(tmp_path / "big.npy", np.full((4, 3), 1e6, dtype=np.float32))
    r = _import(tmp_path, "--split", f"train={tmp_path / 'big.npy'}", "--dtype", "float16")
    assert r.exit_code != 0 and "float16" in r.output
    assert good.read_bytes() == before and not list(tmp_path.glob(".o.h5.*"))  # the good file is kept
    for groups in (["p1", "p2"], ["p1"] * 6):
        np.savez(tmp_path / "g.npz", cls=x, groups=np.array(groups))
        r = _import(tmp_path, "--split", f"train={tmp_path / 'g.npz'}")
        assert r.exit_code != 0 and f"{len(groups)} groups for 4 feature rows" in r.output
    torch.save((torch.as_tensor(x), torch.tensor([0, 1, 0, 1])), tmp_path / "tuple.pt")
    r = _import(tmp_path, "--split", f"train={tmp_path / 'tuple.pt'}")
    assert r.exit_code != 0 and "holds a tuple of 2 items; save a dict" in r.output


def test_import_byte_string_labels_h5_labels_and_one_finding(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.savez(tmp_path / "b.npz", cls=x, labels=np.array([b"cat", b"dog", b"cat", b"dog"]),
             paths=np.array([b"a.png", b"b.png", b"c.png", b"d.png"]))
    r = _import(tmp_path, "--split", f"train={tmp_path / 'b.npz'}")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:  # not "b'cat'", "b'a.png'"
        assert store.classes == ["cat", "dog"] and store["train"].paths[0] == "a.png"
    import h5py

    np.save(tmp_path / "x.npy", x)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["labels"] = np.array([1, 0, 1, 1])
    np.save(tmp_path / "finding.npy", np.array([[1], [0], [0], [1]]))
    r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'y.h5'}")
    assert r.exit_code == 0, r.output
    r = _import(tmp_path, "--split", f"train={tmp_path / 'x.npy'}", "--labels", f"train={tmp_path / 'finding.npy'}",
                "--classes", "pneumonia")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:  # one named finding: an (N, 1) 0/1 column is that finding
        assert store.multilabel and store.classes == ["pneumonia"]
        assert store["train"].labels.tolist() == [[1], [0], [0], [1]]


def test_import_nan_names_and_an_unlabelled_split_beside_named_ones(tmp_path):
    import torch

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    torch.save({"features": torch.as_tensor(x), "labels": ["cat", float("nan"), "dog", "cat"]}, tmp_path / "a.pt")
    np.savez(tmp_path / "t.npz", cls=x, labels=np.full(4, -1))
    r = _import(tmp_path, "--split", f"train={tmp_path / 'a.pt'}", "--split", f"test={tmp_path / 't.npz'}")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:  # no class "nan", and the unlabelled split is no kind of labels
        assert store.classes == ["cat", "dog"] and store["train"].labels.tolist() == [0, -1, 1, 0]
        assert store["test"].labels.tolist() == [-1, -1, -1, -1]
    long = ",".join(f"finding_{i:03d}" for i in range(40))  # longer than a file name may be
    np.savez(tmp_path / "m.npz", cls=x, labels=np.eye(40, dtype=int)[:4])
    r = _import(tmp_path, "--split", f"train={tmp_path / 'm.npz'}", "--classes", long)
    assert r.exit_code == 0, r.output
    np.savez(tmp_path / "n.npz", cls=x, labels=np.array(["cat", np.nan, "dog", "cat"]))  # numpy writes 'nan'
    r = _import(tmp_path, "--split", f"train={tmp_path / 'n.npz'}")
    assert r.exit_code == 0, r.output
    with fc.open(tmp_path / "o.h5") as store:
        assert store.classes == ["cat", "dog"] and store["train"].labels.tolist() == [0, -1, 1, 0]
    (tmp_path / "pointer.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    r = _import(tmp_path, "--split", f"train={tmp_path / 'pointer.pt'}")
    assert r.exit_code != 0 and "cannot read" in r.output, r.output
    (tmp_path / "cut.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:200])
    r = _import(tmp_path, "--split", f"train={tmp_path / 'cut.pt'}")
    assert r.exit_code != 0 and "cannot read" in r.output and "truncated" in r.output


def test_resuming_a_file_of_older_decoding_rules_says_so(tiny_vit, tmp_path, caplog):
    import h5py
    import json as _json

    _images(tmp_path / "d", ["a/0.png", "b/0.png"])
    fc.extract(str(tiny_vit), tmp_path / "d", tmp_path / "f.h5", workers=0).close()
    with h5py.File(tmp_path / "f.h5", "r+") as f:  # as an earlier featcache wrote it: no decode_rules
        config = _json.loads(f.attrs["config"])
        config.pop("decode_rules")
        f.attrs["config"] = _json.dumps(config, sort_keys=True)
    with caplog.at_level("WARNING", logger="featcache"):
        fc.extract(str(tiny_vit), tmp_path / "d", tmp_path / "f.h5", workers=0).close()
    assert "made by an earlier featcache whose decoding differed for" in caplog.text
    caplog.clear()
    _images(tmp_path / "d", ["a/1.png"])
    with caplog.at_level("WARNING", logger="featcache"):
        with fc.extract(str(tiny_vit), tmp_path / "d", tmp_path / "f.h5", workers=0, update=True) as store:
            assert store.config.get("decode_rules", 1) == 1  # still holds rows of the older rules
    assert "earlier featcache" in caplog.text
