"""Bounded fuzzing (hypothesis) of what reads untrusted bytes: the image decoder and the dataset parsers answer
with an image / an index or with a finegrain error, never with anything else."""

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from finegrain.data import load_dataset
from finegrain.data.loading import decode_image
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.errors import BadImageError, DataError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def _valid_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _valid_png()


@FUZZ
@given(st.one_of(st.binary(max_size=2048), st.tuples(st.integers(0, len(PNG) - 1), st.binary(min_size=1, max_size=8))))
def test_decoder_answers_an_image_or_a_bad_image_error(data):
    if isinstance(data, tuple):  # a valid PNG with a few bytes overwritten: the decoder's deep paths
        at, patch = data
        data = PNG[:at] + patch + PNG[at + len(patch) :]
    try:
        img = decode_image(io.BytesIO(data), "fuzz", max_pixels=1_000_000)
    except BadImageError:
        return
    assert img.mode == "RGB" and img.width * img.height <= 1_000_000


@FUZZ
@given(st.binary(max_size=600))
def test_manifest_parser_answers_an_index_or_a_data_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a.png").write_bytes(PNG)
        (root / "m.csv").write_bytes(b"path,label,split\na.png,x,train\n" + content)
        try:
            index = load_dataset(root / "m.csv", val_fraction=0.0, test_fraction=0.0)
        except DataError:
            return
        assert index.samples and all(0 <= s.label < len(index.classes) for s in index.samples)


@FUZZ
@given(st.sampled_from(["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt"]),
       st.binary(max_size=300))  # fmt: skip
def test_cub_parser_answers_an_index_or_a_data_error(name, content):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "001.A").mkdir(parents=True)
        (root / "images" / "001.A" / "a.png").write_bytes(PNG)
        files = {"images.txt": b"1 001.A/a.png\n", "classes.txt": b"1 001.A\n", "image_class_labels.txt": b"1 1\n",
                 "train_test_split.txt": b"1 1\n"}  # fmt: skip
        files[name] = content
        for file, data in files.items():
            (root / file).write_bytes(data)
        try:
            index = load_dataset(root, val_fraction=0.0, test_fraction=0.0)
        except DataError:
            return
        assert all(0 <= s.label < len(index.classes) for s in index.samples)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


#: (PNG colour type, bit depths it allows): grey, RGB, palette, grey + alpha, RGBA
PNG_KINDS = [(0, (1, 2, 4, 8, 16)), (2, (8, 16)), (3, (1, 2, 4, 8)), (4, (8, 16)), (6, (8, 16))]


def png(w: int, h: int, depth: int = 8, colour: int = 0, rows: int | None = None) -> bytes:
    """A PNG claiming ``w`` x ``h``, with ``rows`` rows of (flat, highly compressible) pixels; None: all of them (the
    caller keeps those small). A truncated file's rows are at most 4 KB: the header may claim 2^31 pixels a row."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    plte = _chunk(b"PLTE", bytes(range(48))) if colour == 3 else b""
    width_bytes = (w * depth * channels + 7) // 8
    row = b"\x00" + bytes(width_bytes if rows is None else min(width_bytes, 4096))  # a truncated file: a few KB
    idat = zlib.compress(row * (h if rows is None else min(rows, h)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + plte + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@st.composite
def png_headers(draw) -> bytes:
    """A PNG whose header claims any size, aspect ratio, colour type and bit depth: complete where its raw pixels
    fit in 8 MB, else a few rows (a truncated file)."""
    colour, depths = draw(st.sampled_from(PNG_KINDS))
    depth = draw(st.sampled_from(depths))
    w = draw(st.one_of(st.integers(1, 64), st.integers(1, 2**31 - 1)))
    h = draw(st.one_of(st.integers(1, 64), st.integers(1, 2**31 - 1)))
    raw = w * h * depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] // 8
    return png(w, h, depth, colour, None if raw <= 8 << 20 and draw(st.booleans()) else draw(st.integers(0, 3)))


@st.composite
def small_images(draw) -> bytes:
    """Real images of every mode PIL writes, any aspect ratio within a small area."""
    mode, fmt = draw(st.sampled_from([("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("I;16", "PNG"),
                                      ("I", "TIFF"), ("F", "TIFF"), ("P", "PNG"), ("LA", "PNG"), ("1", "PNG"),
                                      ("CMYK", "JPEG"), ("RGB", "WEBP")]))  # fmt: skip
    w, h = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
    assume(w * h <= 200_000)
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=fmt)
    return buf.getvalue()


@settings(FUZZ, max_examples=80)
@given(st.one_of(png_headers(), small_images()))
@example(png(40_000_000, 1))  # the hostile-files issue's thin images: a 500 (OverflowError) and 1.3 GB before
@example(png(400_000, 100))
def test_any_image_header_gives_the_model_its_input_or_a_clear_refusal(data):
    """The hostile-files issue's contract for the decode path shared by train, predict, serve and data check: a
    tensor of the model's input size, or a BadImageError (not an image, truncated, too many pixels, too thin)."""
    try:
        img = decode_image(io.BytesIO(data), "generated", max_pixels=40_000_000)  # the server's default
    except BadImageError:
        return
    x = eval_transform(Preprocess(input_size=64))(img)
    assert x.shape == (3, 64, 64) and torch.isfinite(x).all()
