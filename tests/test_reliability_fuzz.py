"""Generated odd and bad inputs (hypothesis) for every method's processor + model + post-processing, and
for the pipeline.

The property: a call either gives a correct result — one boolean mask per expression at its image's
displayed size (EXIF orientation applied), finite logits, a score in [0, 1] — or raises a `ValueError`
whose message names the argument (`images`, `text`, `target_sizes`). No other exception type, ever.

Inputs: PIL images of every mode (1, L, LA, P with and without transparency, RGB, RGBA, CMYK, I, I;16, F)
and sizes 1..2048 per side; EXIF orientations 1-8; numpy arrays of many dtypes and layouts (HW, HWC,
CHW, 1/3/4 channels, and shapes that are no image); torch tensors (bfloat16 and float16 too); image files,
truncated files, files that are no image, folders, missing paths; texts empty, blank, 10 000 characters,
non-ASCII, emoji, control characters, lists of mixed types, nested lists, counts that do not pair with
the images. The number of examples per test comes from the hypothesis profile (`tests/conftest.py`:
`refseg-ci` by default, `REFSEG_HYPOTHESIS_PROFILE=refseg-thorough` for a long run); the example
database is off and generation derandomised, so the suite is reproducible.
"""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from refseg.pipelines import load_pipeline
from refseg.training import METHODS

ARGUMENT_NAMES = ("`images`", "`text`", "`image`", "`target_sizes`")
PIL_MODES = ("1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "I", "I;16", "F")
# (dtype, value range that is valid for refseg, or None when the dtype is refused)
DTYPES = {
    "uint8": (0, 255), "uint16": (0, 65535), "int16": (0, 255), "int32": (0, 255), "int64": (0, 255),
    "float16": (0.0, 1.0), "float32": (0.0, 1.0), "float64": (0.0, 1.0), "bool": (0, 1),
    "int8": None, "complex64": None, "uint32-large": None, "float32-out-of-range": None,
}
EXIF_ORIENTATION = 0x0112
ERROR = "error"  # the expected outcome of an input refseg must refuse


def side():
    return st.one_of(st.integers(1, 12), st.integers(1, 2048))


def _noise(seed, shape, low, high, dtype):
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.uniform(low, high, size=shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(size=shape) > 0.5
    return rng.integers(low, high + 1, size=shape).astype(dtype)


@st.composite
def pil_images(draw):
    """`(image, (height, width) as displayed)`."""
    mode, width, height = draw(st.sampled_from(PIL_MODES)), draw(side()), draw(side())
    seed = draw(st.integers(0, 2**16))
    base = Image.fromarray(_noise(seed, (min(height, 64), min(width, 64), 3), 0, 255, np.uint8))
    rgb = base.resize((width, height), Image.NEAREST)
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
    elif mode in ("I", "I;16", "F"):
        image = rgb.convert("L").convert(mode)  # "F": values 0..255, out of [0, 1]: clipped, documented
    else:
        image = rgb.convert(mode)
    orientation = draw(st.integers(1, 8))
    if orientation != 1 and mode in ("L", "RGB", "RGBA", "P"):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif.tobytes())
        image = Image.open(io.BytesIO(buffer.getvalue()))
        if orientation >= 5:  # rotated by 90 degrees: the displayed image is transposed
            width, height = height, width
    return image, (height, width)


@st.composite
def arrays(draw, as_tensor=False):
    """`(array or tensor, (height, width) or ERROR)`."""
    name = draw(st.sampled_from(sorted(DTYPES)))
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    layout = draw(st.sampled_from(["HW", "HWC1", "HWC3", "HWC4", "CHW1", "CHW3", "CHW4", "1-D", "4-D",
                                   "HWC2", "empty"]))
    valid = DTYPES[name]
    dtype = {"uint32-large": np.uint32, "float32-out-of-range": np.float32}.get(name, name)
    shape = {"HW": (height, width), "HWC1": (height, width, 1), "HWC3": (height, width, 3),
             "HWC4": (height, width, 4), "CHW1": (1, height, width), "CHW3": (3, height, width),
             "CHW4": (4, height, width), "1-D": (width,), "4-D": (1, 3, height, width),
             "HWC2": (height, width, 2), "empty": (0, width, 3)}[layout]
    seed = draw(st.integers(0, 2**16))
    if name == "complex64":
        array = _noise(seed, shape, 0.0, 1.0, np.float32).astype(np.complex64)
    elif name == "int8":
        array = _noise(seed, shape, -100, -1, np.int8)
    elif name == "uint32-large":
        array = _noise(seed, shape, 256, 70000, np.uint32)
    elif name == "float32-out-of-range":
        array = _noise(seed, shape, 1.5, 3.0, np.float32)
    else:
        array = _noise(seed, shape, valid[0], valid[1], dtype)
    if layout == "HWC2" and height in (1, 3, 4):
        expected = None  # (H, W, 2) with H in {1, 3, 4} is a valid channels-first image of H channels
    elif layout in ("1-D", "4-D", "HWC2", "empty") or valid is None:
        expected = ERROR
    elif layout.startswith("CHW") and not as_tensor and width in (1, 3, 4):
        expected = None  # numpy reads (C, H, W) with W in {1, 3, 4} channels-last (documented): either is fine
    elif layout.startswith("HWC") and as_tensor and height in (1, 3, 4):
        expected = None  # and a tensor (H, W, C) with H in {1, 3, 4} channels-first
    elif as_tensor and name == "uint16":
        expected = None  # an int32 tensor: refused unless every value happens to be <= 255
    else:
        expected = (height, width)
    if as_tensor:
        if name in ("uint16", "uint32-large", "complex64"):  # torch has no uint16 arithmetic to speak of
            return torch.from_numpy(array.astype(np.int32) if name != "complex64" else array), expected
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if name == "float32" and draw(st.booleans()):
            tensor = tensor.to(torch.bfloat16)  # numpy has no bfloat16
        return tensor, expected
    return array, expected


@st.composite
def files(draw, folder):
    """A path: a good image file (PNG or JPEG), a truncated one, bytes that are no image, a folder, nothing."""
    kind = draw(st.sampled_from(["png", "jpeg", "truncated", "not-an-image", "folder", "missing"]))
    width, height = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    path = folder / f"{kind}-{draw(st.integers(0, 10**9))}.{'jpg' if kind == 'jpeg' else 'png'}"
    image = Image.new("RGB", (width, height), (200, 30, 30))
    if kind == "folder":
        path.mkdir(exist_ok=True)
        return str(path), ERROR
    if kind == "missing":
        return str(path), ERROR
    if kind == "not-an-image":
        path.write_bytes(draw(st.sampled_from([b"", b"hello world\n", b"\x89PNG\r\n\x1a\n" + b"junk" * 4,
                                               b"GIF89a\0\0\0", b"%PDF-1.4\n", b"\xff\xd8\xff\xe0"])))
        return str(path), ERROR
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if kind == "jpeg" else "PNG")
    data = buffer.getvalue()
    if kind == "truncated":
        data = data[: max(8, len(data) // 3)]
        path.write_bytes(data)
        return str(path), ERROR
    path.write_bytes(data)
    return path if draw(st.booleans()) else str(path), (height, width)


NOT_IMAGES = st.sampled_from([None, 3, 2.5, "not/a/file.png", {"image": None}, object(), b"\x89PNG", []])


def one_image(folder):
    return st.one_of(pil_images(), arrays(), arrays(as_tensor=True), files(folder),
                     NOT_IMAGES.map(lambda x: (x, ERROR)))


GOOD_TEXT = st.sampled_from(["the red square", "the blue circle on the left", "a"])
ODD_TEXT = st.one_of(
    GOOD_TEXT, st.just(""), st.sampled_from([" ", "\t\n ", "\u3000"]), st.just("the red square " * 667),
    st.just("der rote Kreis, ganz links: großes Ö"), st.just("🟥 the red 🔵 circle 👈"), st.just("\x00\x07\x1b[31m red"),
    st.just("\u200b"), st.text(max_size=40),
)


def expressions():
    return st.one_of(ODD_TEXT, st.lists(ODD_TEXT, min_size=0, max_size=3),
                     st.lists(st.one_of(ODD_TEXT, st.integers(), st.none(), st.lists(GOOD_TEXT, max_size=2)),
                              min_size=1, max_size=3))


def _blank(text):
    return isinstance(text, str) and not text.strip()


def expected_pairs(images, text):
    """What refseg must do with this call: `ERROR`, or the list of displayed sizes, one per expression, or
    `None` when either is acceptable (an ambiguous array layout)."""
    image_list = images if isinstance(images, list) else [images]
    outcomes = [expected for _, expected in image_list]
    if not image_list:
        return ERROR
    nested = isinstance(text, list) and bool(text) and all(isinstance(t, list) for t in text)
    groups = text if nested else [text] if isinstance(text, str) else text
    if not isinstance(groups, list) or not groups:
        return ERROR
    if nested:
        if any(not g or not all(isinstance(t, str) and not _blank(t) for t in g) for g in groups):
            return ERROR
        counts = [len(g) for g in groups]
    else:
        if not all(isinstance(t, str) and not _blank(t) for t in groups):
            return ERROR
        counts = [len(groups)] if len(image_list) == 1 else [1] * len(groups)
    if len(counts) != len(image_list) or ERROR in outcomes:
        return ERROR
    if None in outcomes:
        return None
    return [size for size, count in zip(outcomes, counts) for _ in range(count)]


def call_inputs(draw, folder):
    many = draw(st.booleans())
    images = draw(st.lists(one_image(folder), min_size=0, max_size=3)) if many else draw(one_image(folder))
    return images, draw(expressions())


def strip(images):
    return [image for image, _ in images] if isinstance(images, list) else images[0]


def assert_names_an_argument(err):
    assert any(name in str(err) for name in ARGUMENT_NAMES), f"ValueError names no argument: {err}"


@pytest.fixture(scope="module")
def models(trained_on_two_referents):
    return {method: trained_on_two_referents(method)[:2] for method in sorted(METHODS)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_processor_model_and_post_processing_take_anything(method, models, tmp_path_factory):
    model, processor = models[method]
    folder = tmp_path_factory.mktemp(f"fuzz-{method}")
    cases = {"ok": 0, "refused": 0}

    @given(st.data())
    def check(data):
        images, text = call_inputs(data.draw, folder)
        expected = expected_pairs(images, text)
        try:
            inputs = processor(images=strip(images), text=text, return_tensors="pt")
        except ValueError as err:
            assert expected in (ERROR, None), f"refused a valid call: {err}"
            assert_names_an_argument(err)
            cases["refused"] += 1
            return
        assert expected != ERROR, "accepted a call that must be refused"
        sizes = inputs.pop("original_sizes")
        with torch.no_grad():
            outputs = model(**inputs)
        assert torch.isfinite(outputs.logits).all()
        masks = processor.post_process_referring_segmentation(outputs, sizes)
        if expected is not None:
            assert [tuple(m.shape) for m in masks] == expected
        assert all(m.dtype == torch.bool for m in masks)
        cases["ok"] += 1

    check()
    print(f"{method}: {cases['ok'] + cases['refused']} cases ({cases['ok']} segmented, {cases['refused']} refused)")
    assert cases["ok"] > 0 and cases["refused"] > 0, cases


@pytest.mark.parametrize("method", sorted(METHODS))
def test_post_processing_takes_odd_target_sizes(method, models):
    _, processor = models[method]

    @given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8),
           st.lists(st.one_of(st.tuples(st.integers(-2, 600), st.integers(-2, 600)), st.integers(-1, 50),
                              st.just("12x12"), st.none()), max_size=4),
           st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
    def check(batch, h, w, target_sizes, threshold):
        logits = torch.randn(batch, h, w)
        try:
            masks = processor.post_process_referring_segmentation(logits, target_sizes, threshold=threshold)
        except ValueError as err:
            assert any(name in str(err) for name in ("`target_sizes`", "`threshold`", "`logits`")), err
            return
        assert len(masks) == batch == len(target_sizes)
        for mask, size in zip(masks, target_sizes):
            assert tuple(mask.shape) == ((size, size) if isinstance(size, int) else tuple(size))

    check()


@pytest.fixture(scope="module")
def segmenters(trained_on_two_referents):
    return {method: load_pipeline(str(trained_on_two_referents(method)[2]), device=-1) for method in sorted(METHODS)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_pipeline_takes_anything(method, segmenters, tmp_path_factory):
    segmenter = segmenters[method]
    folder = tmp_path_factory.mktemp(f"fuzz-pipeline-{method}")

    @given(st.data())
    def check(data):
        # one image per call (a list is a batch of calls, tested elsewhere); flat texts
        image, expected = data.draw(one_image(folder).filter(lambda drawn: not isinstance(drawn[0], list)))
        text = data.draw(st.one_of(ODD_TEXT, st.lists(st.one_of(ODD_TEXT, st.integers(), st.none()), max_size=3)))
        expected = expected_pairs((image, expected), text)
        try:
            results = segmenter(image, text=text)
        except ValueError as err:
            assert expected in (ERROR, None), f"refused a valid call: {err}"
            assert_names_an_argument(err)
            return
        assert expected != ERROR, "accepted a call that must be refused"
        texts = [text] if isinstance(text, str) else text
        assert [r["text"] for r in results] == texts
        for result, size in zip(results, expected or [None] * len(results)):
            assert result["mask"].mode == "L" and set(np.unique(np.asarray(result["mask"]))) <= {0, 255}
            assert math.isfinite(result["score"]) and 0.0 <= result["score"] <= 1.0
            if size is not None:
                assert result["mask"].size == (size[1], size[0])

    check()


def test_an_image_file_far_too_large_is_refused_before_it_is_decoded(tmp_path):
    """A PNG whose header claims 30 000 x 30 000 pixels (900 M, over PIL's decompression-bomb limit)."""
    import struct
    import zlib

    from refseg.processing_utils import load_image

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="`images`: the image file .* is too large to decode"):
        load_image(str(path))
