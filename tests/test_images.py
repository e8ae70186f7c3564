"""visual_search.images on the generated corpus of broken and odd files, and to_rgb per mode."""

from __future__ import annotations

import io
import pathlib
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from bench import decode as decode_bench
from visual_search import images
from visual_search.images import (
    ERROR_CODES,
    UPLOAD_FORMATS,
    ImageError,
    Limits,
    Preprocess,
    decode,
    load,
    media_type,
    to_rgb,
)

try:  # tests/ run as a rootdir-relative package or as a plain folder on sys.path
    import tests.corpus as corpus
except ImportError:  # pragma: no cover
    import corpus  # type: ignore[no-redef]

PAD = Preprocess(224, "pad")
CROP = Preprocess(224, "crop")
WITH_FILE = [it for it in corpus.ITEMS if it.name != corpus.MISSING]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("corpus")
    corpus.make_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def read(corpus_dir: pathlib.Path):
    return lambda name: (corpus_dir / name).read_bytes()


def _code(fn, *args, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        fn(*args, **kwargs)
    assert info.value.code in ERROR_CODES
    return info.value.code


# --- the corpus itself -------------------------------------------------------------------


def test_corpus_is_deterministic_small_and_quick(tmp_path, corpus_dir):
    t0 = time.perf_counter()
    items = corpus.make_corpus(tmp_path)
    assert time.perf_counter() - t0 < 2.0
    assert items == list(corpus.ITEMS)
    assert len({it.name for it in items}) == len(items)
    for it in items:
        assert it.expected is None or it.expected in ERROR_CODES, it
        path = tmp_path / it.name
        if it.name == corpus.MISSING:
            assert not path.exists()
            continue
        assert path.read_bytes() == (corpus_dir / it.name).read_bytes(), it.name
        if it.name != corpus.STRIP:
            assert path.stat().st_size < 200_000, it.name


def test_corpus_lists_the_missing_file_without_writing_it(corpus_dir):
    (missing,) = [it for it in corpus.ITEMS if it.expected == "read_error"]
    assert missing.name == corpus.MISSING and missing.note == "missing file"
    assert not (corpus_dir / missing.name).exists()
    assert any("/" in it.name for it in corpus.ITEMS)  # some live in subfolders


@pytest.mark.parametrize("item", [it for it in WITH_FILE if it.usable], ids=lambda it: it.name)
def test_usable_images_are_real_and_not_tiny(item, read):
    with Image.open(io.BytesIO(read(item.name))) as img:
        assert min(img.size) >= 16


# --- every file: usable -> (224, 224, 3) uint8, broken -> exactly the expected code -------


@pytest.mark.parametrize("item", WITH_FILE, ids=lambda it: it.name)
@pytest.mark.parametrize("pre", [PAD, CROP], ids=["pad", "crop"])
def test_load_each_corpus_file(item, pre, read):
    data = read(item.name)
    if item.usable:
        arr = load(data, pre)
        assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
        assert arr.std() > 1.0  # some structure survives
    else:
        assert _code(load, data, pre) == item.expected, item.note


@pytest.mark.parametrize("item", [it for it in WITH_FILE if it.usable], ids=lambda it: it.name)
def test_decode_gives_upright_rgb_of_the_header_size(item, read):
    data = read(item.name)
    img = decode(data)
    assert img.mode == "RGB"
    with Image.open(io.BytesIO(data)) as raw:
        size = ImageOps.exif_transpose(raw).size if item.name == corpus.EXIF_ROTATED else raw.size
    assert img.size == size


@pytest.mark.parametrize(
    "data",
    [
        b"hello, not an image",
        b"\x00" * 100,
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        b"8BPS\x00\x01" + b"\x00" * 40,  # PSD: a format Pillow knows but the catalog refuses
    ],
    ids=["text", "zeros", "pdf", "psd"],
)
def test_non_images_in_memory_are_not_an_image(data):
    assert _code(decode, data) == "not_an_image"


def test_formats_outside_the_list_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "ICO")
    with Image.open(io.BytesIO(buf.getvalue())) as img:  # Pillow itself opens it
        assert img.format == "ICO"
    assert _code(decode, buf.getvalue()) == "not_an_image"


# --- specific behaviours ------------------------------------------------------------------


def test_palette_transparency_is_white(read):
    arr = np.asarray(decode(read(corpus.PALETTE_TRNS)))
    x0, y0, x1, y1 = corpus.PALETTE_TRANSPARENT_BOX
    assert (arr[y0:y1, x0:x1] == 255).all()  # index 0 is black underneath
    assert tuple(arr[46, 62]) == (200, 40, 40)  # opaque background index 1
    assert tuple(arr[33, 50]) == (30, 60, 200)  # opaque rectangle index 3


def test_rgba_is_composited_on_white(read):
    data = read(corpus.RGBA_PNG)
    arr = np.asarray(decode(data)).astype(int)
    x0, y0, x1, y1 = corpus.RGBA_TRANSPARENT_BOX
    assert (arr[y0:y1, x0:x1] == 255).all()  # transparent black -> white, not black
    with Image.open(io.BytesIO(data)) as raw:
        rgba = np.asarray(raw.convert("RGBA")).astype(float)
    alpha = rgba[..., 3:] / 255.0
    expected = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    assert np.abs(arr - expected).max() <= 1.5


def test_16bit_png_is_scaled_not_clipped(read):
    data = read(corpus.GRAY16)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")  # really 16-bit on disk
        assert np.asarray(raw).max() == 65535
    arr = np.asarray(decode(data)).astype(int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    row = arr[corpus.GRAY16_SIZE[1] // 2, :, 0]
    assert row[0] <= 2 and row[-1] >= 253
    assert (np.diff(row) >= 0).all()  # monotonic
    assert (row == 255).mean() < 0.05  # not saturated over most of the ramp
    assert abs(row[len(row) // 2] - 128) <= 3  # linear: the middle is mid-grey
    expected = np.linspace(0, 255, len(row))
    assert np.abs(row - expected).max() <= 2


def test_cmyk_converts_to_sensible_rgb(read):
    data = read(corpus.CMYK)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    arr = np.asarray(decode(data)).astype(int)
    x0, y0, x1, y1 = corpus.CMYK_CYAN_BOX
    cyan = arr[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4].reshape(-1, 3).mean(axis=0)
    assert cyan[0] < 60 and cyan[1] > 200 and cyan[2] > 200, cyan
    magenta = arr[12:36, 56:84].reshape(-1, 3).mean(axis=0)
    assert magenta[0] > 200 and magenta[1] < 60 and magenta[2] > 200, magenta
    paper = arr[2:6, :].reshape(-1, 3).mean(axis=0)
    assert (paper > 240).all(), paper  # C=M=Y=K=0 is white, not black (no inversion)
    black = arr[54, 48]
    assert (black < 40).all(), black


def test_animated_gif_decodes_the_first_frame(read):
    data = read(corpus.ANIMATED)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == len(corpus.GIF_FRAME_COLOURS)
    arr = np.asarray(decode(data)).astype(int)
    first = np.array(corpus.GIF_FRAME_COLOURS[0])
    patch = arr[20:36, 20:44].reshape(-1, 3)
    assert np.abs(patch - first).max() <= 8
    for other in corpus.GIF_FRAME_COLOURS[1:]:
        assert np.abs(patch.mean(axis=0) - np.array(other)).max() > 100


def test_exif_rotation_matches_upright_twin(read):
    rotated, upright = read(corpus.EXIF_ROTATED), read(corpus.UPRIGHT)
    with Image.open(io.BytesIO(rotated)) as raw:
        assert raw.getexif().get(corpus.ORIENTATION) == 6
        assert raw.size == (427, 640)  # stored sideways
    a, b = decode(rotated), decode(upright)
    assert a.size == b.size == (640, 427)
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.mean() < 3.0
    # the wrong direction would be far off
    wrong = a.transpose(Image.Transpose.ROTATE_180)
    assert np.abs(np.asarray(wrong).astype(int) - np.asarray(b).astype(int)).mean() > 20
    la, lb = load(rotated, PAD).astype(int), load(upright, PAD).astype(int)
    assert np.abs(la - lb).mean() < 3.0


def test_pad_keeps_the_whole_strip_and_crop_does_not(read):
    data = read(corpus.STRIP)
    padded = load(data, PAD)
    white_rows = (padded == 255).all(axis=(1, 2))
    content = np.flatnonzero(~white_rows)
    assert len(content) <= 5  # 50/4000 * 224 = 2.8 rows
    assert content.min() >= 105 and content.max() <= 118  # centred
    assert white_rows[:100].all() and white_rows[125:].all()  # white above and below
    middle = padded[content[len(content) // 2]].astype(int)
    assert (middle.sum(axis=1) < 600).mean() > 0.95  # content across the whole width
    cropped = load(data, CROP)
    assert not (cropped == 255).all(axis=(1, 2)).any()  # no padding rows
    assert np.abs(cropped.astype(int) - padded.astype(int)).mean() > 50


def test_max_bytes(read):
    data = read(corpus.RGB_PNG)
    assert _code(decode, data, Limits(max_bytes=len(data) - 1)) == "too_large"
    assert decode(data, Limits(max_bytes=len(data))).size == (160, 120)


def test_max_pixels_is_checked_before_decoding(read, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data = read(corpus.RGB_PNG)  # 160x120 = 19200 pixels
    with pytest.raises(ImageError) as info:
        decode(data, Limits(max_pixels=19_199))
    assert info.value.code == "too_large" and "19199" in info.value.detail
    # 8000x8000 is over our default 40 Mpx but under Pillow's own bomb warning (89 Mpx):
    # our check must fire, from the header alone (the IDAT is garbage).
    header = corpus.png_header_only(8000, 8000)
    with pytest.raises(ImageError) as info:
        decode(header)
    assert info.value.code == "too_large" and "40000000" in info.value.detail
    t0 = time.perf_counter()
    for _ in range(20):
        assert _code(decode, read(corpus.HUGE_HEADER), Limits(max_pixels=1000)) == "too_large"
    assert time.perf_counter() - t0 < 0.5


def test_pixel_limit_still_allows_just_enough(read):
    assert decode(read(corpus.RGB_PNG), Limits(max_pixels=19_200)).size == (160, 120)


def test_min_side(read):
    data = read(corpus.RGB_PNG)
    assert _code(decode, data, Limits(min_side=121)) == "too_small"
    assert decode(data, Limits(min_side=120)).size == (160, 120)


def test_truncation_is_not_hidden_by_a_global_flag(read, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode(read(corpus.TRUNCATED))


# --- to_rgb per mode ------------------------------------------------------------------------


def _image(mode: str, values, palette=None, **info) -> Image.Image:
    if mode == "1":
        img = Image.fromarray(np.array([values], dtype=bool))
    elif mode == "I;16":
        img = Image.fromarray(np.array([values], dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.array([values], dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(np.array([values], dtype=np.float32))
    else:
        img = Image.new(mode, (len(values), 1))
        if palette is not None:
            img.putpalette(palette)
        for x, v in enumerate(values):
            img.putpixel((x, 0), v)
    assert img.mode == mode
    img.info.update(info)
    return img


PALETTE = [0, 0, 0, 200, 40, 40, 40, 160, 60] + [0] * (253 * 3)
RED = (255, 0, 0)

TO_RGB_CASES = [
    ("1", _image("1", [False, True]), [(0, 0, 0), (255, 255, 255)]),
    ("L", _image("L", [0, 128, 255]), [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
    ("LA", _image("LA", [(100, 255), (100, 0)]), [(100, 100, 100), (255, 255, 255)]),
    ("P", _image("P", [0, 1, 2], PALETTE), [(0, 0, 0), (200, 40, 40), (40, 160, 60)]),
    (
        "P+transparency",
        _image("P", [0, 1, 2], PALETTE, transparency=0),
        [(255, 255, 255), (200, 40, 40), (40, 160, 60)],
    ),
    ("I;16", _image("I;16", [0, 32768, 65535]), [(0,) * 3, (128,) * 3, (255,) * 3]),
    # I;16 is 16 bits deep whatever its values: a nearly black 16-bit image stays nearly black.
    ("I;16 dark", _image("I;16", [0, 200, 255]), [(0,) * 3, (1,) * 3, (1,) * 3]),
    ("I", _image("I", [0, 1000, 65535]), [(0,) * 3, (4,) * 3, (255,) * 3]),
    ("F 0..1", _image("F", [0.0, 0.25, 1.0]), [(0,) * 3, (64,) * 3, (255,) * 3]),
    ("F 0..255", _image("F", [0.0, 100.4, 255.0]), [(0,) * 3, (100,) * 3, (255,) * 3]),
    (
        "CMYK",
        _image("CMYK", [(255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]),
        [(0, 255, 255), (255, 255, 255), (0, 0, 0), (255, 0, 0)],
    ),
    (
        "RGBA",
        _image("RGBA", [(*RED, 255), (*RED, 0), (*RED, 128), (0, 0, 0, 0)]),
        [RED, (255, 255, 255), (255, 127, 127), (255, 255, 255)],
    ),
    ("RGB", _image("RGB", [RED, (1, 2, 3)]), [RED, (1, 2, 3)]),
]


@pytest.mark.parametrize(
    ("img", "expected"),
    [case[1:] for case in TO_RGB_CASES],
    ids=[case[0] for case in TO_RGB_CASES],
)
def test_to_rgb(img, expected):
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    got = np.asarray(out).astype(int)[0]
    assert np.abs(got - np.array(expected)).max() <= 1, got.tolist()


def test_to_rgb_keeps_rgb_as_is():
    img = _image("RGB", [RED])
    assert to_rgb(img) is img


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_media_type_comes_from_the_bytes(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    assert media_type(buf.getvalue()) == Image.MIME[fmt]


@pytest.mark.parametrize(
    "data", [b"", b"PATH=/usr/bin\n", b"RIFF\x00\x00\x00\x00WAVE", b"%PDF-1.7"]
)
def test_media_type_of_non_images_is_none(data):
    assert media_type(data) is None


def test_formats_can_be_narrowed():
    """Uploads leave TIFF out: a TIFF is then "unsupported", other formats still decode."""
    tiff, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tiff, format="TIFF")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(jpeg, format="JPEG")
    uploads = Limits(formats=UPLOAD_FORMATS)
    assert "TIFF" not in UPLOAD_FORMATS and decode(tiff.getvalue()).size == (32, 32)
    with pytest.raises(ImageError) as info:
        decode(tiff.getvalue(), uploads)
    assert info.value.code == "unsupported" and "image/tiff" in info.value.detail
    assert decode(jpeg.getvalue(), uploads).size == (32, 32)
    with pytest.raises(ImageError) as info:
        decode(b"plain text, no image", uploads)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "I", "RGB"])
def test_strip_reduction_equals_converting_the_whole_image(mode, monkeypatch):
    """Large uploads are converted strip by strip and box-reduced: pixel for pixel what
    converting the whole image and reducing it gives (odd sizes, several strips)."""
    monkeypatch.setattr(images, "STRIP_PIXELS", 37 * 53)
    img = decode_bench.gradient(mode, (301, 217))
    for factor in (2, 3, 7):
        got = np.asarray(images._reduced_rgb(img, factor))
        want = np.asarray(to_rgb(img).reduce(factor))
        assert got.shape == want.shape == (-(-217 // factor), -(-301 // factor), 3)
        assert np.array_equal(got, want), (mode, factor)


def test_large_images_are_reduced_before_conversion_and_stay_upright():
    """A 2400x1500 PNG, above 3x the 224 px target, takes the reduced path: the result is close
    to the full-size conversion and its EXIF orientation is still applied."""
    img = decode_bench.gradient("RGBA", (2400, 1500))
    exif = Image.Exif()
    exif[corpus.ORIENTATION] = 6
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif, compress_level=1)
    reduced = decode(buf.getvalue(), draft_size=224)
    assert reduced.size == (1500 // 2, 2400 // 2)  # factor 2, turned upright
    full = decode(buf.getvalue()).resize(reduced.size, Image.Resampling.BOX)
    assert full.size == reduced.size
    diff = np.abs(np.asarray(full).astype(int) - np.asarray(reduced).astype(int))
    assert diff.mean() < 1.0
    la, lb = load(buf.getvalue(), PAD), PAD(decode(buf.getvalue()))
    assert np.abs(la.astype(int) - lb.astype(int)).mean() < 2.0


@pytest.mark.parametrize("kind", ["RGBA", "I;16", "WEBP"])
def test_a_40_megapixel_upload_decodes_within_300_mb(kind, tmp_path):
    """Decode memory is bounded: a 40 Mpx RGBA or 16-bit PNG peaks at <= 300 MB over the RSS
    before the decode (in a fresh process; Linux's VmHWM, reset first); a WebP, which
    Pillow can only decode whole, is refused above its own pixel limit instead."""
    path = tmp_path / f"big.{'webp' if kind == 'WEBP' else 'png'}"
    img = decode_bench.gradient("RGBA" if kind == "WEBP" else kind, (8000, 5000))
    decode_bench.save(img, "WEBP" if kind == "WEBP" else "PNG", path)
    del img
    result = decode_bench.measure(path)
    assert result["code"] == ("too_large" if kind == "WEBP" else "ok"), result
    assert result["peak_mb"] <= 300, (kind, result)


def _tinted_product(border: tuple[int, int, int]) -> Image.Image:
    """A white-backdrop product shot under a colour cast: a dark square on `border`."""
    a = np.empty((120, 160, 3), np.float32)
    a[:] = border
    a[40:80, 60:100] = np.asarray(border, np.float32) * 0.3
    return Image.fromarray(a.astype(np.uint8))


def test_balance_backdrop_scales_a_tinted_backdrop_to_white():
    img = _tinted_product((200, 180, 230))
    out = np.asarray(images.balance_backdrop(img), np.float32)
    assert np.abs(out[:10, :10] - 255).max() <= 1  # the backdrop is white again
    # the product is scaled by the same per-channel gains: its cast is gone too
    centre = out[60, 80]
    assert np.ptp(centre) <= 2 and 70 <= centre.mean() <= 85
    # a query photo through load(backdrop=True) is the balanced one, preprocessed
    buf = io.BytesIO()
    img.save(buf, "PNG")
    pre = images.Preprocess(size=64)
    balanced = images.load(buf.getvalue(), pre, backdrop=True)
    np.testing.assert_array_equal(balanced, pre(images.balance_backdrop(img)))
    assert not np.array_equal(balanced, images.load(buf.getvalue(), pre))


@pytest.mark.parametrize(
    "why",
    ["dark", "busy"],
)
def test_balance_backdrop_leaves_other_photos_alone(why):
    """A dark border, or a textured one (a scene, not a backdrop), keeps its colours."""
    if why == "dark":
        img = _tinted_product((60, 50, 70))
    else:
        noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
    assert images.balance_backdrop(img) is img
