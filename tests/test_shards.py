"""WebDataset shards: `finegrain data shard` writes what a run on the source saw, and a run on the shards is the
same run; damaged shards are named with the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finegrain.cli import main
from finegrain.data import load_dataset, open_sample
from finegrain.data.shards import write_shards
from finegrain.engine.train import fit
from finegrain.errors import BadImageError, DataError
from finegrain.report.evaluation import evaluate_checkpoint

from .conftest import make_cub, make_imagefolder


def test_shards_keep_images_labels_split_boxes_and_parts(tmp_path):
    source = load_dataset(make_cub(tmp_path / "cub", per_class=6), seed=3)
    info = write_shards(source, tmp_path / "shards", shard_size=5, progress=False)
    sizes = {sp: len(source.split(sp)) for sp in ("train", "val", "test") if source.split(sp)}
    assert {sp: v["shard_lengths"] for sp, v in info["splits"].items()} == {
        sp: [5] * (n // 5) + ([n % 5] if n % 5 else []) for sp, n in sizes.items()
    }
    shards = load_dataset(tmp_path / "shards", seed=99)  # the stored split, whatever the seed
    assert shards.format == "shards" and shards.classes == source.classes and shards.part_names == source.part_names
    for split in ("train", "val", "test"):
        a, b = source.split(split), shards.split(split)
        assert [(s.label, s.bbox, s.parts, s.read_bytes()) for s in a] == [(s.label, s.bbox, s.parts, s.read_bytes())
                                                                          for s in b]  # fmt: skip
    assert shards.split("train")[0].key.endswith("train-000000.tar#train00000000.jpg")
    assert not list((tmp_path / "shards").glob("*.partial"))


def test_a_run_on_shards_is_the_run_on_the_folder(tmp_path, tiny_config, capsys):
    folder = make_imagefolder(tmp_path / "data", num_classes=3, per_class=8)
    assert main(["data", "shard", str(folder), str(tmp_path / "shards"), "--shard-size", "4", "--val-fraction",
                 "0.2", "--test-fraction", "0.25", "--seed", "1"]) == 0  # fmt: skip
    assert "train on it with --data" in capsys.readouterr().out
    for kind, options in (("frozen", {}), ("finetuned", {"freeze_backbone": False, "epochs": 1})):
        runs = {}
        for name, data in (("folder", folder), ("shards", tmp_path / "shards")):
            cfg = tiny_config(data, seed=1, test_fraction=0.25, run_dir=str(tmp_path / f"{kind}-{name}"), **options)
            runs[name] = fit(cfg).model.state_dict()
        for k, v in runs["folder"].items():
            torch.testing.assert_close(runs["shards"][k], v, atol=0, rtol=0, msg=f"{kind}: {k} differs")
    a = evaluate_checkpoint(tmp_path / "frozen-folder" / "best.pt", workers=0)
    b = evaluate_checkpoint(tmp_path / "frozen-shards" / "best.pt", workers=0)
    assert a["n"] == b["n"] == 6 and a["top1"] == b["top1"]
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "shards"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 3 and not report["bad_files"]


def test_damaged_shards_are_named(tmp_path):
    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=6)
    (folder / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "shards"
    write_shards(load_dataset(folder, seed=0), out, shard_size=4, progress=False)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(load_dataset(folder, seed=0), out, progress=False)
    index = load_dataset(out)
    broken = next(s for s in index.samples if s.read_bytes().startswith(b"\xff\xd8 not"))
    with pytest.raises(BadImageError, match=r"-00000\d\.tar#\w+\.jpg"):
        open_sample(broken)
    info = json.loads((out / "_info.json").read_text())
    shard = out / info["splits"]["train"]["filenames"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"shard '{shard}'.*(truncated|incomplete)"):
        load_dataset(out)
    shard.write_bytes(data)
    (out / "_info.json").write_text(json.dumps({**info, "classes": []}))
    with pytest.raises(DataError, match="no class list"):
        load_dataset(out)
    (out / "_info.json").write_text(json.dumps(info))
    shard.unlink()
    with pytest.raises(DataError, match=rf"shard '{shard}' listed in _info.json does not exist"):
        load_dataset(out)


def test_skip_bad_reports_the_shard_member(tmp_path, tiny_config):
    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=6)
    (folder / "class_1" / "broken.jpg").write_bytes(b"not an image")
    write_shards(load_dataset(folder, seed=0, test_fraction=0.0), tmp_path / "shards", progress=False)
    fit(tiny_config(tmp_path / "shards", skip_bad=True, epochs=1))
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and ".tar#" in skipped[0]


def _spec(folder: Path, pipe: bool = False) -> str:
    info = json.loads((folder / "_info.json").read_text())
    urls = [str(folder / name) for v in info["splits"].values() for name in v["filenames"]]
    return "wds:" + "::".join(f"pipe:cat {u}" if pipe else u for u in urls)


def test_streamed_shards_train_evaluate_and_check(tmp_path, tiny_config, capsys):
    folder = make_imagefolder(tmp_path / "data", num_classes=3, per_class=30)
    write_shards(load_dataset(folder, seed=0, val_fraction=0.2), tmp_path / "shards", shard_size=8, progress=False)
    spec = _spec(tmp_path / "shards", pipe=True)  # through a command, as from object storage
    result = fit(tiny_config(spec, epochs=6, lr=1e-2, cache_features=False))  # frozen backbone, images each epoch
    # 15 validation and 18 test images, 3 classes: a model at chance reaches 75% with probability below 0.001
    assert len(result.history) == 6 and result.history[-1]["val_n"] == 15 and result.history[-1]["val_top1"] >= 0.75
    r = evaluate_checkpoint(tmp_path / "run" / "best.pt", workers=0)
    folder_test = load_dataset(tmp_path / "shards").split("test")
    assert r["n"] == len(folder_test) == 18 and r["top1"] >= 0.75
    capsys.readouterr()
    assert main(["data", "check", spec, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == {sp: len(load_dataset(tmp_path / "shards").split(sp)) for sp in ("train", "val", "test")}
    with pytest.raises(Exception, match="not cached as features"):
        fit(tiny_config(spec))


def test_streamed_resume_is_exact(tmp_path, tiny_config, monkeypatch):
    from .conftest import fit_killed_in_epoch

    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=8)
    write_shards(load_dataset(folder, seed=0), tmp_path / "shards", shard_size=3, progress=False)
    options = dict(freeze_backbone=False, epochs=3, cache_features=False)
    straight = fit(tiny_config(_spec(tmp_path / "shards"), run_dir=str(tmp_path / "a"), **options))
    fit_killed_in_epoch(monkeypatch, 1, tiny_config(_spec(tmp_path / "shards"), run_dir=str(tmp_path / "b"), **options))
    resumed = fit(None, resume=tmp_path / "b")
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{k} differs after resume")


@pytest.mark.filterwarnings("ignore:--skip-bad")
def test_bad_streams_are_named(tmp_path, tiny_config):
    with pytest.raises(DataError, match="holds nothing|cannot be read"):
        load_dataset(f"wds:{tmp_path}/train-{{000000..000001}}.tar")
    with pytest.raises(DataError, match="not named SPLIT-NNNNNN.tar"):
        load_dataset(f"wds:{tmp_path}/cub-000000.tar")
    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=6)
    (folder / "class_0" / "zz_broken.jpg").write_bytes(b"not an image")
    write_shards(load_dataset(folder, seed=0, test_fraction=0.0), tmp_path / "shards", shard_size=20, progress=False)
    shard = tmp_path / "shards" / "train-000000.tar"
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "train-000009.tar")) as sink:  # shards from elsewhere: no class list
        sink.write({"__key__": "a", "jpg": b"x", "cls": b"0"})
    with pytest.raises(DataError, match="class list is missing"):
        load_dataset(f"wds:{tmp_path}/train-000009.tar")
    cfg = dict(freeze_backbone=False, epochs=1, cache_features=False, val_fraction=0.0)
    with pytest.raises(BadImageError, match=r"train-000000\.tar#\w+\.jpg"):
        fit(tiny_config(f"wds:{shard}", **cfg))
    with pytest.warns(UserWarning, match=r"--skip-bad: skipped .*train-000000\.tar#"):
        fit(tiny_config(f"wds:{shard}", skip_bad=True, **cfg))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=rf"shard '{shard}' cannot be read"):
        fit(tiny_config(f"wds:{shard}", skip_bad=True, **cfg))


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["shard-folder", "streamed"])
def test_two_process_ddp_on_uneven_shards(tmp_path, streamed):
    """Both ranks end with bit-identical weights, take the same number of steps, and see disjoint images."""
    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=13)  # uneven: 26 images, shards of 5
    write_shards(load_dataset(folder, seed=0, val_fraction=0.25), tmp_path / "shards", shard_size=5, progress=False)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = _spec(tmp_path / "shards") if streamed else str(tmp_path / "shards")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), data,
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"ranks differ at {k}")
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [e["batches"] for e in seen[0]] == [e["batches"] for e in seen[1]]  # equal steps
    assert not set(seen[0][0]["keys"]) & set(seen[1][0]["keys"])  # disjoint images in an epoch
    if streamed:  # each rank reads its own shards, which hold different numbers of images
        assert len(set(seen[0][0]["keys"])) != len(set(seen[1][0]["keys"]))


def _two_nodes(worker: Path, args: list[str], env: dict) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents (one process each) meeting through a c10d rendezvous on loopback, as two nodes would."""
    from .conftest import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=fg-test-{port}", "--max-restarts=1", str(worker),
           *args]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in "ab"]  # fmt: skip
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(cmd, node.returncode, out, err))
    except subprocess.TimeoutExpired:
        for node in nodes:  # the agents and their workers: nothing left running after a failed test
            os.killpg(node.pid, signal.SIGKILL)
        logs = "\n".join(node.communicate()[1][-3000:] for node in nodes)
        pytest.fail(f"the two-node run did not finish in 300 s:\n{logs}")
    return done


@pytest.mark.slow
def test_two_nodes_train_from_shards_and_resume_after_a_node_dies(tmp_path):
    """Two torchrun "nodes" on loopback train from shards; then the same run again, where one node's worker is
    killed after epoch 1: torchrun (--max-restarts=1) restarts both, they resume from last.pt, and the run ends
    with the uninterrupted run's weights."""
    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=10)
    write_shards(load_dataset(folder, seed=0, val_fraction=0.2), tmp_path / "shards", shard_size=4, progress=False)
    worker = Path(__file__).with_name("elastic_worker.py")
    # as docs/distributed.md says to run torchrun: without it a restarted group can read the dead round's addresses
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    runs = {}
    for name, extra in (("straight", {}), ("killed", {"FG_TEST_KILL_RANK": "1"})):
        out = tmp_path / name
        nodes = _two_nodes(worker, [str(tmp_path / "shards"), str(out), "3"], {**env, **extra})
        assert all(n.returncode == 0 for n in nodes), "\n".join(n.stderr[-2000:] for n in nodes)
        epochs = [json.loads(x)["epoch"] for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3], epochs  # the restart ran epochs 2 and 3 only
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (tmp_path / "killed" / "killed").is_file()  # the kill happened
    straight = runs["straight"][0]
    for k in straight:
        torch.testing.assert_close(straight[k], runs["straight"][1][k], atol=0, rtol=0, msg=f"ranks differ at {k}")
        torch.testing.assert_close(straight[k], runs["killed"][0][k], atol=0, rtol=0, msg=f"{k} differs after restart")


def test_a_worker_restarted_by_torchrun_continues_its_run(tmp_path, tiny_config, monkeypatch):
    """What torchrun --max-restarts does after a process or node dies: the same command again, with
    the same TORCHELASTIC_RUN_ID; the run continues from last.pt and ends as the uninterrupted one."""
    from .conftest import fit_killed_in_epoch

    folder = make_imagefolder(tmp_path / "data", num_classes=2, per_class=8)
    write_shards(load_dataset(folder, seed=0), tmp_path / "shards", shard_size=3, progress=False)
    options = dict(freeze_backbone=False, epochs=3, cache_features=False)
    straight = fit(tiny_config(_spec(tmp_path / "shards"), run_dir=str(tmp_path / "a"), **options))
    cfg = tiny_config(_spec(tmp_path / "shards"), run_dir=str(tmp_path / "b"), **options)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    fit_killed_in_epoch(monkeypatch, 1, cfg)
    restarted = fit(cfg)  # the same call, not --resume
    assert [r["epoch"] for r in restarted.history] == [2, 3]
    for (k, a), b in zip(straight.model.state_dict().items(), restarted.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{k} differs after the restart")
