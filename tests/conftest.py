"""Tiny generated datasets in each layout: fast, and learnable (the class decides colour and shape)."""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

# pytest-xdist (`-n N`): the N workers share the cores, each with its share of threads, set before torch is imported:
# OpenMP threads oversubscribed spin against each other (a head's two threads ran at 1% of their idle speed beside
# another PyTorch job: finegrain.env.HEAD_THREADS)
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image, ImageDraw

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.models import create_model

CUB100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub100"
COLOURS = [(220, 40, 40), (40, 180, 40), (40, 60, 220), (230, 200, 30)]


def synthetic_image(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Noise background; a class-coloured shape at a random place (square for even, disc for odd)."""
    bg = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    r = size // 5
    cx, cy = rng.integers(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    colour = COLOURS[label % len(COLOURS)]
    (draw.rectangle if label % 2 == 0 else draw.ellipse)(box, fill=colour)
    return img


def write_images(folder: Path, label: int, n: int, rng: np.random.Generator, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img_{i:03d}.jpg"
        synthetic_image(label, rng).save(p, quality=95)
        paths.append(p)
    return paths


def make_imagefolder(root: Path, num_classes: int = 4, per_class: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        write_images(root / f"class_{c}", c, per_class, rng)
    return root


def move_some_images(root: Path) -> list[str]:
    """Move one image of three ImageFolder classes into another class's folder (three wrong labels); their new
    paths relative to ``root``."""
    moved = []
    for src, dst in (("class_0", "class_1"), ("class_2", "class_3"), ("class_3", "class_0")):
        f = sorted((root / src).iterdir())[0]
        shutil.move(f, root / dst / f"moved_{f.name}")
        moved.append(f"{dst}/moved_{f.name}")
    return moved


def make_cub(root: Path, num_classes: int = 4, per_class: int = 10, seed: int = 0, parts: bool = True) -> Path:
    """The official CUB-200-2011 file set, with boxes and two part keypoints per image."""
    rng = np.random.default_rng(seed)
    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for c in range(num_classes):
        name = f"{c + 1:03d}.Species_{c}"
        for i, p in enumerate(write_images(root / "images" / name, c, per_class, rng)):
            image_id += 1
            images.append(f"{image_id} {name}/{p.name}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if i < per_class // 2 else 0}")
            boxes.append(f"{image_id} 4.0 5.0 40.0 30.0")
            locs += [f"{image_id} 1 10.0 12.0 1", f"{image_id} 2 0.0 0.0 0"]
    (root / "classes.txt").write_text("".join(f"{c + 1} {c + 1:03d}.Species_{c}\n" for c in range(num_classes)))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    if parts:
        (root / "parts").mkdir()
        (root / "parts" / "parts.txt").write_text("1 beak\n2 tail\n")
        (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "folder")


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return make_cub(tmp_path / "cub")


def tiny_config_factory(folder: Path):
    """A config factory for fast runs: 64 px inputs, no workers, caches and run inside ``folder``."""

    def make(data: Path, **overrides) -> TrainConfig:
        base = dict(
            data=str(data),
            input_size=64,
            epochs=3,
            batch_size=8,
            workers=0,
            amp="none",
            cache_dir=str(folder / "cache"),
            run_dir=str(folder / "run"),
            val_fraction=0.2,
            head="sgd",  # epochs: what most tests exercise (test_probe.py covers the probe and auto)
        )
        base.update(overrides)
        return TrainConfig().replace(**base)

    return make


@pytest.fixture
def tiny_config(tmp_path: Path):
    """:func:`tiny_config_factory` in the test's folder."""
    return tiny_config_factory(tmp_path)


def pytest_collection_modifyitems(items: list) -> None:
    """The slow tests first, then the rest, each in file order. Under ``--dist worksteal`` the first worker starts on
    the slow ones, the other on short ones, and a worker that runs dry takes the back half of the other's queue.
    Starting each worker on every other slow test was slower (20.1 against 17.6 min on 2 cores, docs/testing.md):
    the workers then waited on each other's shared fixtures (``made_once``)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def budget_clock_stopped(monkeypatch):
    """The budget's clock (``recipe.clock``) stopped at 0: the head stage takes none of the budget, so a budgeted
    test plans its fine-tuning from the speeds it mocks and the loader time it measures, not from how fast or busy
    the machine running it is (the cut-mix test planned 27 epochs where it needs 30 on an AMD EPYC Zen 3, and two
    plan tests found no time left beside another job). The fine-tuning's own ``--time-limit`` still runs on the
    real clock."""
    from finegrain.engine import recipe  # noqa: PLC0415

    monkeypatch.setattr(recipe, "clock", lambda: 0.0)


@pytest.fixture(autouse=True)
def _few_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


def require_data(path: Path) -> None:
    """Tests on ../shared/data: skipped on a developer's machine without it, a failure in CI (``CI`` set), where a
    missing dataset must not turn real-data tests into quiet skips."""
    if not path.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"real data not found at {path}")


def needs_cub100():
    return pytest.mark.usefixtures("_cub100_present")


@pytest.fixture
def _cub100_present():
    require_data(CUB100)


def make_checkpoint(path: Path, method: str = "baseline", classes=("a", "b", "c"), return_model: bool = False,
                    **kwargs):  # fmt: skip
    """An untrained (random, no download) 64-px checkpoint: for plumbing tests that need no accuracy. Its floating
    buffers (BatchNorm statistics, centres) are moved off their initial values, so a save or load that drops a
    buffer gives different outputs. ``return_model``: also the model as saved, the reference for reload tests."""
    torch.manual_seed(0)
    model = create_model(method, num_classes=len(classes), pretrained=False, **kwargs).eval()
    model.preprocess = replace(model.preprocess, input_size=64)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and buf.numel():
                buf.copy_(
                    torch.rand_like(buf) + 0.5 if name.endswith("running_var") else buf + 0.1 * torch.randn_like(buf)
                )
    Checkpoint.from_model(model, list(classes)).save(path)
    return (path, model) if return_model else path


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]):
    """``make(folder)``'s value, made once per test run in a folder of its own: under pytest-xdist the first worker
    to ask makes it and the others wait for it (a file lock) and read it back, where each would otherwise make its
    own (the cub10 head took ~45 s a worker). What is made this way is only read by the tests using it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    with FileLock(f"{root}.lock"):
        done = root / "made.pickle"
        if done.is_file():
            return pickle.loads(done.read_bytes())
        root.mkdir(exist_ok=True)
        value = make(root)
        done.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def cub10_checkpoint(tmp_path_factory) -> Path:
    """A linear head on frozen ImageNet lite0 for 10 cub100 species (real photos, 224 px), trained once per
    test run and shared by the slow real-data tests."""
    require_data(CUB100)
    return made_once(tmp_path_factory, "cub10", _train_cub10)


def _train_cub10(root: Path) -> Path:
    from finegrain.data import load_dataset
    from finegrain.engine.train import fit

    index = load_dataset(CUB100, val_fraction=0.0)
    with (root / "cub10.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        for s in index.samples:
            if s.label % 10 == 0:
                writer.writerow([str(s.path), index.classes[s.label], s.split])
    cfg = TrainConfig().replace(
        data=str(root / "cub10.csv"), input_size=224, epochs=15, batch_size=8, workers=0, amp="auto",
        val_fraction=0.0, cache_dir=str(root / "cache"), run_dir=str(root / "run"),
    )  # fmt: skip
    return fit(cfg.validate()).run_dir / "last.pt"


PATTERN_COLOURS = [(230, 30, 30), (30, 200, 30), (40, 80, 240)]


def part_image(label: int, rng: np.random.Generator, size: int = 128) -> tuple[Image.Image, tuple[int, int]]:
    """A cluttered scene whose class is a small coloured square on the 'head' (a black disc); squares of the
    other classes' colours lie around as distractors, so the head's square is the only reliable cue.
    Returns the image and the head keypoint."""
    img = Image.fromarray(rng.integers(70, 170, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # grey clutter
        x, y = rng.integers(0, size - 20, size=2)
        w, h = rng.integers(8, 30, size=2)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(60, 200, size=3)))
    hx, hy = (int(v) for v in rng.integers(18, size - 18, size=2))
    draw.ellipse((hx - 13, hy - 13, hx + 13, hy + 13), fill=(10, 10, 10))
    draw.rectangle((hx - 5, hy - 5, hx + 5, hy + 5), fill=PATTERN_COLOURS[label])
    for _ in range(2):  # distractors: other classes' squares, away from the head
        while True:
            dx, dy = (int(v) for v in rng.integers(6, size - 6, size=2))
            if abs(dx - hx) > 24 or abs(dy - hy) > 24:
                break
        colour = PATTERN_COLOURS[int(rng.choice([c for c in range(len(PATTERN_COLOURS)) if c != label]))]
        draw.rectangle((dx - 5, dy - 5, dx + 5, dy + 5), fill=colour)
    return img, (hx, hy)


def make_part_cub(root: Path, per_class: int = 40, seed: int = 0, size: int = 128) -> Path:
    """CUB layout with a synthetic ``parts/part_locs.txt``: one keypoint, 'head', decides the class."""
    rng = np.random.default_rng(seed)
    images, labels, split, locs = [], [], [], []
    for c in range(len(PATTERN_COLOURS)):
        name = f"{c + 1:03d}.Pattern_{c}"
        (root / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            img, (hx, hy) = part_image(c, rng, size)
            img.save(root / "images" / name / f"{i:03d}.png")
            image_id = len(images) + 1
            images.append(f"{image_id} {name}/{i:03d}.png")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if i < per_class * 2 // 3 else 0}")
            locs.append(f"{image_id} 1 {hx} {hy} 1")
    (root / "classes.txt").write_text(
        "".join(f"{c + 1} {c + 1:03d}.Pattern_{c}\n" for c in range(len(PATTERN_COLOURS)))
    )
    for fname, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        (root / fname).write_text("\n".join(rows) + "\n")
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 head\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list, env: dict | None = None, cwd: Path | None = None):
    """A real server process (``command`` ends with `serve MODEL [options]`; the port is added) on a free loopback
    port; yields its base URL once /v1/health answers, and stops it afterwards."""
    import httpx

    port = free_port()
    server = subprocess.Popen([*map(str, command), "--port", str(port), "--log-level", "warning"], env=env,
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None:
                    pytest.fail(f"server exited: {server.stderr.read()}")
                time.sleep(0.2)
        else:
            pytest.fail("server did not answer /v1/health within a minute")
        yield base
    finally:
        server.terminate()
        server.wait(10)


def fit_killed_in_epoch(monkeypatch, epoch: int, config: TrainConfig) -> None:
    """Run ``fit(config)`` and stop it (KeyboardInterrupt) when epoch ``epoch`` (0-based) begins, after the
    previous epoch's checkpoint was written: a kill between epochs."""
    import finegrain.engine.train as train_module

    real_epoch = train_module.train_one_epoch

    def killed(*args, **kwargs):
        if args[7] == epoch:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.fit(config)
    finally:
        monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
