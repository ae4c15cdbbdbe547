import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import make_imagefolder


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    data = make_imagefolder(tmp_path / "data", num_classes=2, per_class=12)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(data), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"ranks differ at {k}")
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], initial[k])]
    assert not moved, "rank 0 saved weights that are not the ones it trained"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once (rank 0), not once per rank
    split = (tmp_path / "run" / "split.csv").read_text().splitlines()
    n_val = sum(line.endswith(",val") for line in split)
    assert n_val == 4 and [r["val_n"] for r in rows] == [4, 4]  # both ranks' halves counted, on rank 0 too


@pytest.mark.slow
def test_one_process_under_torchrun_trains_through_ddp(tmp_path):
    """One GPU means one process: it still joins a process group (nccl there), so that path is the one run."""
    data = make_imagefolder(tmp_path / "data", num_classes=2, per_class=8)
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(worker),
           str(data), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["ddp"] is True and environment["world_size"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_loss"] > 0 for r in rows)
