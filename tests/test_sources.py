"""Data sources and decoding: layouts, manifests, every awkward image kind, DICOM against pydicom."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.sources import DecodeOptions, ImageDecodeError, discover, load_image


def _png(path: Path, value: int = 100, mode: str = "L", size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


# ---------------------------------------------------------------------------------- sources

def test_single_split_folder_is_named_all_and_sorted(tmp_path):
    for c in ("dog", "cat"):
        for i in (3, 1, 2):
            _png(tmp_path / c / f"{i}.png")
    src = discover(tmp_path)
    assert list(src.splits) == ["all"] and src.classes == ["cat", "dog"]
    rows = src.splits["all"]
    assert rows.paths == ["cat/1.png", "cat/2.png", "cat/3.png", "dog/1.png", "dog/2.png", "dog/3.png"]
    assert rows.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(f.is_absolute() and f.exists() for f in rows.files)


def test_split_folders_share_classes_and_allow_absent_class(tmp_path):
    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "train" / "b" / "1.png")
    _png(tmp_path / "test" / "b" / "2.png")
    _png(tmp_path / "test" / "9.png")  # loose image in a split folder: unlabelled
    src = discover(tmp_path)
    assert sorted(src.splits) == ["test", "train"] and src.classes == ["a", "b"]
    assert src.splits["test"].paths == ["test/9.png", "test/b/2.png"]
    assert src.splits["test"].labels.tolist() == [-1, 1]
    assert discover(tmp_path, split="train").splits.keys() == {"train"}
    with pytest.raises(ValueError, match="has test, train|has train, test"):
        discover(tmp_path, split="val")


def test_an_empty_class_folder_is_named_not_dropped_silently(tmp_path, caplog):
    """A class folder without images vanished from the class list without a word (a 3-class task
    became a 2-class one), and one empty in test only left test without that class unsaid."""
    import logging

    for split in ("train", "test"):
        _png(tmp_path / split / "cat" / "1.png")
        (tmp_path / split / "zebra").mkdir(parents=True)
    _png(tmp_path / "train" / "dog" / "1.png")
    (tmp_path / "test" / "dog").mkdir()
    (tmp_path / "train" / "zebra" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="featcache"):
        src = discover(tmp_path)
    assert src.classes == ["cat", "dog"]
    assert ("class folder(s) without images (looked for .jpg" in caplog.text
            and "test/dog/, test/zebra/, train/zebra/; class(es) zebra have no image in any split, so they are "
                "not among the 2 classes" in caplog.text), caplog.text


def test_images_beside_split_folders_are_named_not_dropped_silently(tmp_path, caplog):
    """root/train/, root/test/ and a class folder root/cat/ put at the top by mistake: only the
    split folders are read, and the run says which images it leaves out."""
    import logging

    _png(tmp_path / "train" / "a" / "1.png")
    _png(tmp_path / "test" / "a" / "2.png")
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png")
    _png(tmp_path / "loose.png")
    (tmp_path / "notes").mkdir()  # a folder without images is not worth a word
    with caplog.at_level(logging.WARNING, logger="featcache"):
        src = discover(tmp_path)
    assert sorted(src.splits) == ["test", "train"] and src.classes == ["a"]
    assert "these images are not read: cat/ (3 images), directly in the folder (1 image)" in caplog.text
    assert "notes" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featcache"):
        discover(tmp_path / "train")  # a plain root/<class>/ folder: nothing left out, nothing said
    assert caplog.text == ""


def test_unlabelled_folder(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    src = discover(tmp_path)
    assert src.classes == [] and src.splits["all"].labels.tolist() == [-1, -1, -1]


def test_csv_manifest_with_split_and_group(tmp_path):
    for name in ("x1.png", "x2.png", "x3.png", "sub/x4.png"):
        _png(tmp_path / "img" / name)
    (tmp_path / "m.csv").write_text("path,label,split,group\nimg/x2.png,pneu,train,p1\nimg/x1.png,normal,train,p2\n"
                                    "img/sub/x4.png,normal,test,p3\nimg/x3.png,,test,p3\n")
    src = discover(tmp_path / "m.csv")
    assert src.kind == "csv" and src.classes == ["normal", "pneu"]
    assert src.splits["train"].paths == ["img/x1.png", "img/x2.png"]
    assert src.splits["train"].labels.tolist() == [0, 1]
    assert src.splits["train"].groups == ["p2", "p1"]
    assert src.splits["test"].paths == ["img/sub/x4.png", "img/x3.png"]
    assert src.splits["test"].labels.tolist() == [0, -1]  # empty label = unlabelled
    assert src.splits["test"].files[0] == (tmp_path / "img/sub/x4.png").resolve()


def test_multilabel_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,effusion,nodule\na.png,1,0\nb.png,0,0\nc.png,1,1\n")
    src = discover(tmp_path / "m.csv")
    assert src.multilabel and src.classes == ["effusion", "nodule"]
    assert src.splits["all"].labels.tolist() == [[1, 0], [0, 0], [1, 1]]
    explicit = discover(tmp_path / "m.csv", label_columns=["nodule"])
    assert explicit.classes == ["nodule"] and explicit.splits["all"].labels.shape == (3, 1)


def test_finding_column_with_a_typo_is_refused_not_left_out(tmp_path, caplog):
    """A 0/1 finding with one bad cell (a 2, an empty cell) would be dropped from the labels as if it
    were patient_id: refused, naming the line; a column that is clearly not 0/1 is left out with a
    warning naming it."""
    import logging

    for cell in ("2", ""):
        (tmp_path / "typo.csv").write_text(f"path,effusion,nodule,mass\na.png,1,0,0\nb.png,0,{cell},1\n"
                                           f"c.png,1,1,0\nd.png,0,1,1\n")
        with pytest.raises(ValueError, match=f"column 'nodule' holds 0/1 in 3 of 4 rows, but line 3 holds '{cell}'"):
            discover(tmp_path / "typo.csv")
    (tmp_path / "ok.csv").write_text("path,effusion,nodule,patient_id\na.png,1,0,p7\nb.png,0,0,p8\nc.png,1,1,p9\n")
    with caplog.at_level(logging.WARNING, logger="featcache"):
        src = discover(tmp_path / "ok.csv")
    assert src.classes == ["effusion", "nodule"] and "left out, not all 0/1: patient_id" in caplog.text
    with pytest.raises(ValueError, match=r"has no column 'lbl' \(--label-column\); its columns are: path, effusion"):
        discover(tmp_path / "ok.csv", label_column="lbl")


def test_source_errors_say_what_was_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found.*jpg"):
        discover(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="no 'path' column; its columns are: file, label"):
        discover(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("maker,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello, not pixels"), "not an image"),
])
def test_unreadable_files_raise_with_reason(tmp_path, maker, reason):
    path = tmp_path / "x.png"
    maker(path)
    with pytest.raises(ImageDecodeError, match=reason):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise(tmp_path, fmt):
    rng = np.random.default_rng(0)
    path = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="(?i)truncat|corrupt|cannot decode"):
        load_image(path)


def test_decompression_bomb_refused(tmp_path):
    path = _png(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path, DecodeOptions(max_pixels=10_000))


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = load_image(_png(tmp_path / "g.png", 77))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [77, 77, 77]
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [10, 200, 30]


def test_rgba_alpha_is_composited_onto_black(tmp_path):
    Image.new("RGBA", (4, 4), (200, 100, 50, 128)).save(tmp_path / "a.png")
    px = np.asarray(load_image(tmp_path / "a.png"))[0, 0].astype(int)
    np.testing.assert_allclose(px, np.round(np.array([200, 100, 50]) * 128 / 255), atol=1)


@pytest.mark.parametrize("mode,key", [("L", 100), ("RGB", (100, 100, 100))])
def test_png_transparency_key_is_alpha_too(tmp_path, mode, key):
    """A tRNS key colour is transparency like an alpha channel: onto black, whichever pixel path
    (the uint8 path skipped it, the processor's convert_to_rgb painted it white)."""
    arr = np.full((6, 6), 30, dtype=np.uint8)
    arr[2:4] = 100
    Image.fromarray(arr, "L").convert(mode).save(tmp_path / "k.png", transparency=key)
    alpha = np.where(arr == 100, 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([arr, arr, arr, alpha], axis=-1), "RGBA").save(tmp_path / "a.png")
    keyed = load_image(tmp_path / "k.png")
    assert keyed.info.get("transparency") is None
    np.testing.assert_array_equal(np.asarray(keyed), np.asarray(load_image(tmp_path / "a.png")))
    assert np.asarray(keyed)[2, 0].tolist() == [0, 0, 0] and np.asarray(keyed)[0, 0].tolist() == [30, 30, 30]


def test_16bit_pgm_is_scaled_like_a_16bit_png(tmp_path):
    """Pillow opens a 16-bit PGM as mode I: it was min-max stretched per image (0..255) while the
    same pixels as PNG or TIFF were scaled by 65535."""
    arr = np.array([[0, 1000, 4095, 30000]] * 4, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "s.png")
    Image.fromarray(arr).save(tmp_path / "s.pgm")
    assert Image.open(tmp_path / "s.pgm").mode == "I"
    png = np.asarray(load_image(tmp_path / "s.png"))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "s.pgm")), png)
    assert png[0, :, 0].tolist() == [0, 4, 16, 117]


def test_32bit_integer_image_is_min_max_scaled(tmp_path):
    """12-bit data in an int32 TIFF spans 0..255 (it was divided by 257 as if a 16-bit PNG: 0..16)."""
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.int32), (4, 1))
    Image.fromarray(ramp, "I").save(tmp_path / "i.tif")
    out = np.asarray(load_image(tmp_path / "i.tif"))[..., 0].astype(np.float64)
    np.testing.assert_allclose(out, np.round(ramp * 255.0 / ramp.max()), atol=0)


def test_float_image_with_nan_pixels_is_scaled_by_its_finite_range(tmp_path):
    """One NaN "no data" pixel left a 0..1 float ramp unscaled: the picture came out 0..1 grey levels."""
    ramp = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (4, 1))
    with_nan = ramp.copy()
    with_nan[0, 0] = np.nan
    Image.fromarray(ramp, "F").save(tmp_path / "f.tif")
    Image.fromarray(with_nan, "F").save(tmp_path / "n.tif")
    clean = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    out = np.asarray(load_image(tmp_path / "n.tif"))[..., 0]
    assert clean.max() == 255 and out[0, 0] == 0
    np.testing.assert_array_equal(out[1:], clean[1:])


def test_a_constant_float_image_is_black_whatever_its_value(tmp_path):
    """A one-value float TIFF came out as its value rounded and clipped: 0.7 -> grey 1, 1000 -> 255."""
    for value in (0.7, 1000.0, -5.0):
        Image.fromarray(np.full((4, 4), value, np.float32), "F").save(tmp_path / "c.tif")
        assert np.asarray(load_image(tmp_path / "c.tif")).max() == 0, value


def _grey_png_with_key(depth: int, arr: np.ndarray, key: int) -> bytes:
    """A greyscale PNG with a tRNS transparency key colour, written chunk by chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in arr)
    h, w = arr.shape
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16bit_png_transparency_key_is_black_as_at_8_bits(tmp_path):
    """The 16-bit branch returned before the tRNS key was applied: key pixels kept their grey."""
    arr = np.full((4, 4), 200)
    arr[0, 0] = 100
    for depth, scale in ((8, 1), (16, 257)):
        path = tmp_path / f"k{depth}.png"
        path.write_bytes(_grey_png_with_key(depth, arr * scale, 100 * scale))
        out = np.asarray(load_image(path))
        assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [200, 200, 200], depth


def test_cmyk_converts_to_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg"))[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "16.png"))
    assert out[1, 1].tolist() == [128, 128, 128]  # mid-grey stays mid-grey, not 255
    assert out[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("orientation,expected_corner", [(6, (0, -1)), (8, (-1, 0))])
def test_exif_rotation_is_applied(tmp_path, orientation, expected_corner):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high, a white top-left block
    arr[:5, :5] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = np.asarray(load_image(tmp_path / "r.jpg"))
    assert out.shape[:2] == (40, 20)  # rotated by 90 degrees
    r, c = expected_corner  # where the white block lands after the rotation
    assert out[r * 2 if r >= 0 else r - 1, c * 2 if c >= 0 else c - 1].mean() > 200


# ---------------------------------------------------------------------------------- DICOM

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402


def _reference(ds) -> np.ndarray:
    """pydicom's own pipeline: apply_modality_lut, then apply_voi_lut, whose output range (the
    stored bit range through the rescale) is mapped onto 0..255; no window = the data's range."""
    data = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" not in ds:
        return (data - data.min()) * 255 / (data.max() - data.min())
    bits = ds.BitsStored
    lo, hi = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (apply_voi_lut(data, ds).astype(np.float64) - lo) * 255 / (hi - lo)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_matches_pydicom_luts(tmp_path, name):
    src = Path(get_testdata_file(name, download=False))
    ds = pydicom.dcmread(src)
    out = np.asarray(load_image(src))[..., 0].astype(np.float64)
    assert out.shape == ds.pixel_array.shape
    np.testing.assert_allclose(out, _reference(ds), atol=1.0)


def test_dicom_window_override_and_monochrome1(tmp_path):
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    ds = pydicom.dcmread(src)
    data = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    windowed = np.asarray(load_image(src, DecodeOptions(window=(40.0, 400.0))))[..., 0].astype(np.float64)
    ref = np.clip((data - 39.5) / 399 + 0.5, 0, 1) * 255
    np.testing.assert_allclose(windowed, ref, atol=1.0)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    inverted = np.asarray(load_image(tmp_path / "m1.dcm"))[..., 0].astype(np.float64)
    normal = np.asarray(load_image(src))[..., 0].astype(np.float64)
    np.testing.assert_allclose(inverted, 255 - normal, atol=0)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # pydicom on the lower-case spelling
@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "linear"])
def test_dicom_voi_lut_function_is_applied(tmp_path, function):
    """A window's VOILUTFunction (mammography, DR) gives pydicom's pixels, not the LINEAR ramp's."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the file has no window of its own
    ds.VOILUTFunction = function
    ds.save_as(tmp_path / "f.dcm")
    out = np.asarray(load_image(tmp_path / "f.dcm"))[..., 0].astype(np.float64)
    ds.VOILUTFunction = function.upper()
    np.testing.assert_allclose(out, _reference(ds), atol=1.0)
    if function == "SIGMOID":  # the LINEAR window differs by tens of grey levels
        ds.VOILUTFunction = "LINEAR"
        assert np.abs(out - _reference(ds)).max() > 20


def test_dicom_unknown_voi_lut_function_is_a_clear_error(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.VOILUTFunction = "GAMMA"
    ds.save_as(tmp_path / "g.dcm")
    with pytest.raises(ImageDecodeError, match="unknown DICOM VOILUTFunction 'GAMMA'.*--window"):
        load_image(tmp_path / "g.dcm")


def test_dicom_16bit_without_window_uses_full_range(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    for tag in ("WindowCenter", "WindowWidth"):
        if tag in ds:
            del ds[tag]
    ds.save_as(tmp_path / "nowin.dcm")
    out = np.asarray(load_image(tmp_path / "nowin.dcm"))[..., 0]
    assert out.min() == 0 and out.max() == 255  # stretched over its range, nothing clipped to white
    assert (out == 255).mean() < 0.01


def test_multiframe_dicom_needs_frame(tmp_path):
    src = Path(get_testdata_file("rtdose.dcm", download=False))  # 15-frame RT dose, bundled
    with pytest.raises(ImageDecodeError, match="multi-frame.*--frame"):
        load_image(src)
    img = load_image(src, DecodeOptions(frame=2))
    ds = pydicom.dcmread(src)
    assert img.size == (ds.Columns, ds.Rows)
    # reference: pydicom decodes every frame; frame 2's rescaled values, min..max onto 0..255
    from pydicom.pixels import apply_modality_lut
    f = apply_modality_lut(ds.pixel_array[2], ds).astype(np.float64)
    ref = np.round((f - f.min()) * 255.0 / (f.max() - f.min())).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], ref)
    with pytest.raises(ImageDecodeError, match="out of range"):
        load_image(src, DecodeOptions(frame=99))


def test_a_dicom_claiming_huge_dimensions_is_refused_before_decoding(tmp_path, monkeypatch):
    """An 8 KB DICOM whose Rows x Columns claim 30000 x 30000 made pydicom allocate 1.8 GB before
    failing: the pixel limit PIL images get now applies to DICOM before any pixel is decoded."""
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = 30000, 30000
    ds.save_as(tmp_path / "bomb.dcm")
    decoded = []
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: decoded.append(1)))
    with pytest.raises(ImageDecodeError, match="decompression bomb: 30000x30000 px exceeds the limit"):
        load_image(tmp_path / "bomb.dcm")
    assert decoded == []
    with pytest.raises(ImageDecodeError, match="decompression bomb: 128x128 px"):
        load_image(src, DecodeOptions(max_pixels=10_000))


def test_one_frame_of_a_multiframe_dicom_is_decoded_not_all(monkeypatch):
    """--frame N decoded every frame of the file (a 3D series of 300 frames for one image)."""
    src = Path(get_testdata_file("rtdose.dcm", download=False))
    asked = []
    real = pydicom.dataset.Dataset.pixel_array_options

    def spy(self, **kwargs):
        asked.append(kwargs.get("index"))
        return real(self, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array_options", spy)
    load_image(src, DecodeOptions(frame=4))
    assert asked == [4]


def test_dicom_without_pixels_or_broken_is_an_error(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(ImageDecodeError, match="DICOM"):
        load_image(bad)


def test_an_image_named_dcm_is_named_for_what_it_is(tmp_path):
    """A PNG saved as x.dcm was told to be saved 'as a standard DICOM file'."""
    _png(tmp_path / "x.png").rename(tmp_path / "x.dcm")
    for data in (None, (tmp_path / "x.dcm").read_bytes()):   # a file, and bytes already read
        with pytest.raises(ImageDecodeError, match="a PNG image named like a DICOM file: rename it"):
            load_image(tmp_path / "x.dcm", data=data)
    (tmp_path / "y.dcm").write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageDecodeError, match="not a DICOM Part 10 file"):
        load_image(tmp_path / "y.dcm")


def test_compressed_dicom_without_decoder_is_skipped_with_reason():
    src = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False))
    try:
        pydicom.dcmread(src).pixel_array
        pytest.skip("a JPEG-LS decoder is installed here")
    except Exception:
        pass
    with pytest.raises(ImageDecodeError, match="JPEG-LS") as info:
        load_image(src)
    assert "\n" not in str(info.value)  # one line, fit for the errors table


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_colour_dicom_is_converted_to_rgb_once(name):
    # pydicom's test images have a red block top left; YBR converted twice made it green
    from pydicom.pixels import convert_color_space, pixel_array

    src = Path(get_testdata_file(name, download=False))
    ds = pydicom.dcmread(src)
    out = np.asarray(load_image(src))
    stored = pixel_array(str(src), as_rgb=False)
    np.testing.assert_array_equal(out, convert_color_space(stored, ds.PhotometricInterpretation, "RGB"))
    assert out[5, 5, 0] > 240 and out[5, 5, 1:].max() < 10


def test_palette_colour_dicom_applies_its_colour_table():
    from pydicom.pixels import apply_color_lut

    src = Path(get_testdata_file("examples_palette.dcm", download=False))
    ds = pydicom.dcmread(src)
    out = np.asarray(load_image(src)).astype(np.float64)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    ref = apply_color_lut(ds.pixel_array, ds).astype(np.float64) * 255 / (2**bits - 1)
    assert out.shape == ref.shape  # colour, not the table's indices stretched to grey
    np.testing.assert_allclose(out, ref, atol=0.5 + 1e-9)  # rounding to 8 bits only


def _write_dicom(path: Path, arr: np.ndarray, bits_stored: int | None = None, frames: bool = False,
                 photometric: str = "MONOCHROME2", **tags) -> Path:
    """A minimal uncompressed DICOM Part 10 file of `arr` (frames on axis 0 when `frames`)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns = arr.shape[-2:] if photometric.startswith("MONO") else arr.shape[-3:-1]
    ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if frames:
        ds.NumberOfFrames = arr.shape[0]
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _linear_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 onto 0..255, written from the standard."""
    x = np.asarray(x, np.float64)
    y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= centre - 0.5 - (width - 1) / 2, 0, np.where(x > centre - 0.5 + (width - 1) / 2, 255, y))
    return np.round(y)


def test_an_8bit_voi_lut_of_4096_entries_is_indexed_not_wrapped(tmp_path):
    """A 12-bit image with a 4,096-entry, 8-bit display LUT (CR/DX): pydicom 3.0's apply_voi_lut
    indexes in the entries' uint8, so 256 -> entry 0 and 1000 -> entry 232: a saw-tooth image, no error."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    values = np.array([[0, 255, 256, 1000, 2048, 4095]], dtype=np.uint16)
    lut = np.arange(4096) // 16
    for first, expected in ((0, lut[values]), (1000, lut[np.clip(values.astype(int) - 1000, 0, 4095)])):
        item = Dataset()
        item.LUTDescriptor = [4096, first, 8]
        item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUTData
        path = _write_dicom(tmp_path / f"voi{first}.dcm", values, bits_stored=12, VOILUTSequence=Sequence([item]))
        out = np.asarray(load_image(path))[..., 0]
        np.testing.assert_array_equal(out, expected)  # PS3.3 C.11.2.1.2: LUT[clamp(x - first)], 8 bits = 0..255
    assert expected.tolist() == [[0, 0, 0, 0, 65, 193]]


def test_an_enhanced_multiframe_dicom_frame_gets_its_functional_groups_rescale_and_window(tmp_path):
    """Enhanced CT/MR keep rescale and window per frame or shared (PS3.3 C.7.6.16.2.9/.10); with
    --frame N the frame was stretched over its own min..max instead (up to 173 grey levels off)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.random.default_rng(3).integers(0, 4096, (3, 8, 8)).astype(np.uint16)

    def group(**values) -> Dataset:
        d = Dataset()
        for k, v in values.items():
            setattr(d, k, v)
        return d

    shared = group(PixelValueTransformationSequence=Sequence([group(RescaleIntercept=-1024, RescaleSlope=1,
                                                                    RescaleType="HU")]),
                   FrameVOILUTSequence=Sequence([group(WindowCenter=40, WindowWidth=400)]))
    per_frame = [group(), group(FrameVOILUTSequence=Sequence([group(WindowCenter=500, WindowWidth=1000)])), group()]
    path = _write_dicom(tmp_path / "enhanced.dcm", stored, bits_stored=12, frames=True,
                        SharedFunctionalGroupsSequence=Sequence([shared]),
                        PerFrameFunctionalGroupsSequence=Sequence(per_frame))
    for frame, (centre, width) in ((0, (40, 400)), (1, (500, 1000)), (2, (40, 400))):
        out = np.asarray(load_image(path, DecodeOptions(frame=frame)))[..., 0]
        np.testing.assert_array_equal(out, _linear_window(stored[frame].astype(np.float64) - 1024, centre, width))


def test_a_single_frame_enhanced_dicom_gets_its_functional_groups_too(tmp_path):
    """NumberOfFrames 1 with rescale and window only in the functional groups was stretched over its
    own range (up to 100 grey levels off); as a 3-frame file it decoded right."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.random.default_rng(5).integers(0, 4096, (1, 8, 8)).astype(np.uint16)
    pvt, voi, group = Dataset(), Dataset(), Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope = -100, 2
    voi.WindowCenter, voi.WindowWidth = 300, 400
    group.PixelValueTransformationSequence, group.FrameVOILUTSequence = Sequence([pvt]), Sequence([voi])
    path = _write_dicom(tmp_path / "one.dcm", stored, 12, frames=True, PerFrameFunctionalGroupsSequence=Sequence([group]))
    out = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(out, _linear_window(stored[0] * 2.0 - 100, 300, 400))
    with pytest.raises(ImageDecodeError, match="must be finite"):
        load_image(path, DecodeOptions(window=(40.0, float("nan"))))


def test_jpeg2000_colour_dicom_is_rgb_once_decoded():
    """YBR_RCT / YBR_ICT samples are RGB after a JPEG 2000 decode (PS3.5 8.2.4): every such file was
    lost to 'Conversion from YBR_RCT to RGB is not supported'."""
    src = Path(get_testdata_file("examples_jpeg2k.dcm", download=False))
    ds = pydicom.dcmread(src)
    try:
        reference = ds.pixel_array  # pydicom's own decode (RGB)
    except Exception:
        pytest.skip("no JPEG 2000 decoder here")
    assert ds.PhotometricInterpretation == "YBR_RCT"
    np.testing.assert_array_equal(np.asarray(load_image(src)), reference)


def test_empty_window_tags_and_an_empty_voi_lut_sequence_count_as_absent(tmp_path):
    from pydicom.sequence import Sequence

    stored = np.random.default_rng(0).integers(100, 4000, (8, 8)).astype(np.uint16)
    plain = np.asarray(load_image(_write_dicom(tmp_path / "plain.dcm", stored, 12)))
    empty = _write_dicom(tmp_path / "empty.dcm", stored, 12, WindowCenter=None, WindowWidth=None)
    np.testing.assert_array_equal(np.asarray(load_image(empty)), plain)  # was a TypeError
    windowed = _write_dicom(tmp_path / "win.dcm", stored, 12, WindowCenter=2000, WindowWidth=1000,
                            VOILUTSequence=Sequence([]))
    np.testing.assert_array_equal(np.asarray(load_image(windowed))[..., 0], _linear_window(stored, 2000, 1000))


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom, reading badVR.dcm
def test_malformed_dicom_gets_one_line_reasons_on_both_read_paths(tmp_path):
    """extract decodes the bytes it hashed (load_image(data=...)): an out-of-range --frame raised
    AttributeError there, a NumberOfFrames '1A' a ValueError, YBR_PARTIAL a NotImplementedError,
    and a file without the DICM preamble advised 'force=True', which no option passes."""
    stored = np.zeros((2, 4, 4), np.uint16)
    cases = [(_write_dicom(tmp_path / "mf.dcm", stored, 12, frames=True), DecodeOptions(frame=5),
              "--frame 5 out of range: mf.dcm has 2 frames"),
             (Path(get_testdata_file("badVR.dcm", download=False)), DecodeOptions(),  # pydicom's own
              "NumberOfFrames '1A' is not a number"),
             (_write_dicom(tmp_path / "ybr.dcm", np.zeros((4, 4, 3), np.uint8), photometric="YBR_PARTIAL_422"),
              DecodeOptions(), "photometric interpretation YBR_PARTIAL_422 is not supported"),
             (_write_dicom(tmp_path / "w0.dcm", stored[0], 12, WindowCenter=100, WindowWidth=0), DecodeOptions(),
              "window width 0 must be >= 1 for a LINEAR window")]
    nometa = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    nometa.save_as(tmp_path / "nometa.dcm", enforce_file_format=False, little_endian=True, implicit_vr=False)
    raw = (tmp_path / "nometa.dcm").read_bytes()
    if raw[128:132] == b"DICM":  # pydicom wrote a preamble anyway: strip it to a bare dataset
        (tmp_path / "nometa.dcm").write_bytes(raw[132 + 12 + int.from_bytes(raw[140:144], "little"):])
    cases.append((tmp_path / "nometa.dcm", DecodeOptions(), "not a DICOM Part 10 file"))
    for path, options, message in cases:
        for data in (None, path.read_bytes()):
            with pytest.raises(ImageDecodeError) as info:
                load_image(path, options, data=data)
            assert message in str(info.value) and "\n" not in str(info.value), (path.name, str(info.value))


def test_decoding_the_bytes_read_once_equals_decoding_the_file(tmp_path):
    """The extractor's workers read each input once, hash those bytes and decode them
    (read_input + load_image(data=...)): the pixels, and every refusal, equal load_image(path)."""
    from pydicom.data import get_testdata_file

    from featcache.sources import read_input, row_content

    files = [_png(tmp_path / "grey.png", 77), tmp_path / "sixteen.png", tmp_path / "rot.jpg",
             Path(get_testdata_file("CT_small.dcm", download=False)),
             Path(get_testdata_file("MR_small.dcm", download=False))]
    Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).save(files[1])
    rotated = Image.new("RGB", (16, 8), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(files[2], exif=exif)
    for f in files:
        data, content = read_input(f)
        assert content == row_content(f)  # one digest, however the bytes were read
        np.testing.assert_array_equal(np.asarray(load_image(f, data=data)), np.asarray(load_image(f)))
    broken = tmp_path / "cut.png"
    broken.write_bytes(files[0].read_bytes()[:40])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for f in (broken, empty):
        with pytest.raises(ImageDecodeError) as by_path:
            load_image(f)
        with pytest.raises(ImageDecodeError) as by_bytes:
            load_image(f, data=read_input(f)[0])
        assert str(by_bytes.value) == str(by_path.value)
