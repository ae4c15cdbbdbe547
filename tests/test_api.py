"""The Python API: docs/api.md's example runs as written (on generated data), and finegrain.load(...).predict(...)
answers what `finegrain predict` answers."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finegrain
from finegrain.cli import main
from finegrain.errors import DataError

from .conftest import make_imagefolder

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_example_runs(tmp_path, monkeypatch):
    data = make_imagefolder(tmp_path / "flowers", num_classes=3, per_class=12)
    (data / "daisy").mkdir()
    Image.open(next((data / "class_0").iterdir())).save(data / "daisy" / "image_0801.jpg")
    for i in range(1, 12):  # the example's class folder needs the others' company: a class like the rest
        Image.open(sorted((data / "class_0").iterdir())[i]).save(data / "daisy" / f"image_{i:04d}.jpg")
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    code = code.replace('"../shared/data/flowers17', f'"{data}').replace('"runs/flowers"', f'"{tmp_path / "run"}"')
    tiny = ', input_size=64, epochs=2, workers=0, amp="none", cache_dir="' + str(tmp_path / "cache") + '")'
    code = code.replace('run_dir="' + str(tmp_path / "run") + '")', 'run_dir="' + str(tmp_path / "run") + '"' + tiny)
    assert "input_size=64" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "<docs/api.md example>", "exec"), namespace)  # noqa: S102 - the documentation's own example
    assert namespace["run"].test["n"] > 0 and namespace["heat"].cam.shape == (64, 64)
    assert len(namespace["batch"]) == 2 and len(namespace["top"]) == 3


def test_load_predict_equals_the_cli_and_takes_paths_images_and_arrays(imagefolder, tiny_config, tmp_path, capsys):
    run = finegrain.train(imagefolder, run_dir=tmp_path / "run", input_size=64, epochs=2, workers=0, amp="none",
                          cache_dir=str(tmp_path / "cache"), head="sgd")  # fmt: skip
    assert 0.5 <= run.test["top1"] <= 1 and run.test["n"] == 8 and len(run.history) == 2
    image = sorted(imagefolder.rglob("*.jpg"))[0]
    capsys.readouterr()
    assert main(["predict", str(run.run_dir), str(image), "--json", "--topk", "3", "--engine", "torch"]) == 0
    cli = json.loads(capsys.readouterr().out)[0]["top"]
    model = finegrain.load(run.run_dir, engine="torch")
    assert model.classes == [f"class_{c}" for c in range(4)]
    top = model.predict(image, k=3)
    assert [t["class"] for t in top] == [t["class"] for t in cli]
    assert [t["prob"] for t in top] == pytest.approx([t["prob"] for t in cli], abs=1e-6)
    pil, array = Image.open(image), np.asarray(Image.open(image).convert("RGB"))
    for answer in model.predict([str(image), pil, array], k=3):  # one batch: the same to float rounding
        assert [t["class"] for t in answer] == [t["class"] for t in top]
        assert [t["prob"] for t in answer] == pytest.approx([t["prob"] for t in top], abs=1e-5)
    with pytest.raises(DataError, match="uint8"):
        model.predict(array.astype(np.float32) / 255)
