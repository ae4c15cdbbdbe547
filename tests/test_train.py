import json
import subprocess
import sys

import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.data import load_dataset
from finegrain.data.loading import open_image
from finegrain.data.transforms import eval_transform
from finegrain.engine import train as train_module
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.predict import Predictor

from .conftest import fit_killed_in_epoch, make_imagefolder


def test_frozen_head_learns_the_task(cub, tiny_config):
    result = fit(tiny_config(cub, epochs=15, lr=3e-3))
    last = result.history[-1]
    assert last["val_top1"] >= 0.75  # chance is 0.25
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 15


@pytest.mark.slow
def test_full_finetuning_learns_the_task(tmp_path, tiny_config):
    data = make_imagefolder(tmp_path / "f", num_classes=2, per_class=30)
    result = fit(tiny_config(data, epochs=4, freeze_backbone=False, lr=1e-3, amp="bf16", ema=True, ema_decay=0.9,
                             val_fraction=0.5))  # fmt: skip
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # 24 validation images, 2 classes: a model at chance reaches 80% with probability 0.001
    assert result.counts["val"] == 24 and result.history[-1]["val_top1"] >= 0.8, result.history


def test_checkpoint_round_trip_gives_identical_predictions(cub, tiny_config):
    result = fit(tiny_config(cub, epochs=2))
    ckpt = Checkpoint.load(result.run_dir / "last.pt")
    assert ckpt.classes == load_dataset(cub).classes
    assert ckpt.preprocess.input_size == 64 and ckpt.method == "baseline"
    predictor = Predictor.from_checkpoint(result.run_dir / "last.pt", device="cpu")
    paths = sorted(cub.rglob("*.jpg"))[:6]
    probs = torch.tensor([[t["prob"] for t in r["top"]] for r in predictor.predict_files(paths, k=4)])
    from finegrain.data import open_image

    model = result.model.eval().cpu()  # fitted on the run's device (a GPU where there is one)
    x = torch.stack([predictor.transform(open_image(p)) for p in paths])
    with torch.inference_mode():
        expected = model(x).softmax(-1).topk(4).values
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    rebuilt = ckpt.build_model()
    for k, v in rebuilt.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].cpu(), atol=0, rtol=0)


def test_resume_restores_the_gpus_random_stream_too(monkeypatch):
    """On an H200 the resume tests failed: dropout on a GPU draws from the GPU's generator, which the checkpoint's
    random state left out. A stand-in generator (no GPU here) shows it is saved and put back."""
    from finegrain.engine.setup import rng_state, set_rng_state

    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": gpu.update(state=new.clone()))
    saved = rng_state()
    gpu["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the epochs after the checkpoint drew from it
    set_rng_state(saved)
    assert gpu["state"].tolist() == [1, 2, 3]


def test_resume_continues_exactly(cub, tiny_config, tmp_path, monkeypatch):
    straight = fit(tiny_config(cub, epochs=4, run_dir=str(tmp_path / "a")))

    fit_killed_in_epoch(monkeypatch, 2, tiny_config(cub, epochs=4, run_dir=str(tmp_path / "b")))
    resumed = fit(None, resume=tmp_path / "b")
    assert [r["epoch"] for r in resumed.history] == [3, 4]
    for (k, a), b in zip(
        straight.model.head.state_dict().items(), resumed.model.head.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=f"{k} differs after resume")
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_cli_train_evaluate_predict(cub, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--input-size", "64", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", str(cub), "--epochs", "8", "--lr", "3e-3", "--run-dir", str(run), *common]) == 0
    assert main(["evaluate", str(run), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out
    report = json.loads((run / "eval_test.json").read_text())
    assert report["n"] == 20 and report["top1"] > 0.5
    confusion = (run / "confusion_test.csv").read_text().splitlines()
    assert len(confusion) == 5 and sum(int(v) for line in confusion[1:] for v in line.split(",")[1:]) == 20

    image = sorted(cub.rglob("*.jpg"))[0]
    assert main(["predict", str(run), str(image), "--json", "--topk", "3"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 1 and len(preds[0]["top"]) == 3
    ckpt = Checkpoint.load(run / "best.pt")  # the reference: the saved model's softmax on the image, by hand
    with torch.inference_mode():
        probs = ckpt.build_model()(eval_transform(ckpt.preprocess)(open_image(image))[None]).softmax(1)[0]
    top = probs.topk(3)
    assert [t["class"] for t in preds[0]["top"]] == [ckpt.classes[i] for i in top.indices]
    assert [t["prob"] for t in preds[0]["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert main(["predict", str(run), str(cub / "images"), "--csv", "--topk", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 40 * 2


def test_config_yaml_and_cli_errors(tmp_path, capsys, imagefolder):
    (tmp_path / "c.yaml").write_text("epochs: 0\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(imagefolder)]) == 2
    assert "epochs: 0 is outside 1-100000" in capsys.readouterr().err
    (tmp_path / "d.yaml").write_text("epoch: 3\n")
    assert main(["train", "--config", str(tmp_path / "d.yaml")]) == 2
    assert "unknown config key(s): epoch" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(imagefolder), "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_evaluate_refuses_other_data(cub, tmp_path, tiny_config, capsys):
    result = fit(tiny_config(cub, epochs=1))
    other = make_imagefolder(tmp_path / "other", num_classes=3, per_class=4)
    assert main(["evaluate", str(result.run_dir), "--data", str(other), "--workers", "0"]) == 2
    assert "the data changed since training" in capsys.readouterr().err  # the saved split catches it first


def test_progressive_stages_switch_at_their_epochs_and_resume_mid_stage(cub, tiny_config, tmp_path, monkeypatch):
    stages = [
        {"epochs": 1, "input_size": 48, "jigsaw": 2, "model": {"augment": False}},
        {"epochs": 2, "input_size": 64, "model": {"augment": True}},
    ]
    make = lambda run: tiny_config(  # noqa: E731
        cub, method="wsdan", model_kwargs={"num_maps": 2}, pretrained=False, cache_features=False,
        stages=stages, epochs=99, run_dir=str(tmp_path / run),
    )  # fmt: skip
    seen = []
    real_epoch = train_module.train_one_epoch

    def spy(ctx, task, *args, **kwargs):
        model = task.trainable
        with torch.random.fork_rng():  # reading a sample must not change the training's random stream
            side = task.train_set[0][0].shape[-1]
        (progressive,) = [a for a in ctx.addons if a.name == "progressive"]
        seen.append((model.preprocess.input_size, progressive.jigsaw, model.augment, side))
        return real_epoch(ctx, task, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    straight = fit(make("a"))
    assert seen == [(48, 2, False, 48), (64, 1, True, 64), (64, 1, True, 64)]  # epochs = 1 + 2, not 99
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, 1), (2, 2), (3, 2)]
    assert Checkpoint.load(tmp_path / "a" / "last.pt").preprocess.input_size == 64

    def killed_in_epoch_3(*args, **kwargs):
        if args[7] == 2:  # the epoch argument: stop in the middle of stage 2
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit(make("b"))
    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    seen.clear()
    resumed = fit(None, resume=tmp_path / "b")
    assert seen == [(64, 1, True, 64)]  # set up as stage 2, with stage 1's settings overridden by stage 2's
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{k} differs after resume")


def test_bad_stages_are_refused_with_the_fix(cub, tiny_config):
    with pytest.raises(ConfigError, match="no-cache-features"):
        tiny_config(cub, stages=[{"epochs": 1}])
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_config(cub, cache_features=False, stages=[{"epochs": 1, "size": 3}])
    with pytest.raises(ConfigError, match="jigsaw"):
        tiny_config(cub, cache_features=False, stages=[{"epochs": 1, "jigsaw": 0}])


@pytest.mark.slow
def test_logs_off_a_terminal_have_no_bar_frames_and_quiet_prints_nothing(tmp_path, imagefolder):
    """Output to a file (not a terminal): plain lines, no carriage-return frames of progress bars; --quiet: only
    errors, so a successful run prints nothing."""
    args = [sys.executable, "-m", "finegrain", "train", "--data", str(imagefolder), "--input-size", "64",
            "--epochs", "2", "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--head", "sgd",
            "--no-cache-features"]  # fmt: skip  # images each epoch: the epoch's bar runs
    for extra, name in (([], "plain"), (["--quiet"], "quiet")):
        with (tmp_path / f"{name}.log").open("wb") as log:
            cmd = [*args, "--run-dir", str(tmp_path / name), *extra]
            assert subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0
    plain, quiet = (tmp_path / "plain.log").read_bytes(), (tmp_path / "quiet.log").read_bytes()
    assert b"\r" not in plain and b"epoch 2/2" in plain and len(plain.splitlines()) < 12
    assert quiet == b""
