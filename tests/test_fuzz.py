"""Bounded fuzzing (hypothesis) of what reads untrusted bytes: the image decoder and the dataset parsers answer
with an image / an index or with a finegrain error, never with anything else."""

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from finegrain.data import load_dataset
from finegrain.data.loading import decode_image
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
