"""The ``finegrain`` command line: train, evaluate, predict, explain, export, prune, serve, data check.

This module imports nothing heavy: the handlers (``finegrain.commands``, which pulls in PyTorch, timm and FastAPI)
are looked up by name once a command runs, so ``--help`` answers in well under a second (benchmarks/cli_speed.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finegrain import __version__
from finegrain.cli_flags import _add_output_options, _add_train_options, flag
from finegrain.data.records import FORMATS, MAX_ASPECT
from finegrain.env import configure_threads
from finegrain.errors import FinegrainError
from finegrain.progress import set_verbosity
from finegrain.run_layout import RunDir

#: the handlers' module, imported when a command runs (tests/test_architecture.py checks it sits below this one)
HANDLERS = "finegrain.commands"


def _training_commands(sub) -> None:
    """train, distill (knowledge distillation) and tune: the commands that take every training option."""
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model; works under torchrun (DDP).",
        usage="%(prog)s [--data DATA] [--budget MINUTES] [options]",
    )
    flag(p, "config")
    flag(p, "resume")
    _add_train_options(p)
    p.set_defaults(func="_train")

    p = sub.add_parser(
        "distill", help="train a student taught by one or more finegrain checkpoints (knowledge distillation)",
        description="Train like `finegrain train`, with the averaged soft labels of --teachers checkpoints "
        "(KL at temperature T, plus cross-entropy). With a frozen, cached student backbone the teachers' outputs "
        "for the fixed views are computed once and cached.",
    )  # fmt: skip
    p.add_argument(
        "--teachers",
        "--teacher",
        dest="teachers",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="teacher checkpoint(s), as `train --teachers`",
    )
    flag(p, "config")
    flag(p, "resume")
    _add_train_options(p, skip=("teachers",))
    p.set_defaults(func="_train")

    p = sub.add_parser(
        "tune", help="hyperparameter search within a time budget (Optuna; resumable)",
        description="Search training options on the validation split: cheap trials of the head on cached features "
        "first, then pruned fine-tuning trials while the budget allows. Writes STUDY_DIR/best.yaml (train it with "
        "`finegrain train --config best.yaml`), trials.csv, search.png and study.db (run again to resume).",
    )  # fmt: skip
    p.add_argument(
        "--minutes",
        "--budget",
        dest="budget",
        type=float,
        required=True,
        help="minutes for the whole search (train's --budget is one run's minutes)",
    )
    p.add_argument("--trials", type=int, default=50, help="trials in all, resumed ones included (50)")
    p.add_argument("--study-dir", default="runs/tune", help="(default: runs/tune)")
    flag(p, "config")
    _add_train_options(p, skip=("budget", "time_limit", "finetune_lr", "run_dir"))
    p.set_defaults(func="_tune")


def _model_commands(sub) -> None:
    """evaluate and predict: the commands that read a trained model."""
    p = sub.add_parser("evaluate", help="top-1/top-5/per-class accuracy and confusion matrix")
    flag(p, "checkpoint")
    flag(p, "data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="(default: test)")
    flag(p, "batch_size", default=64)
    flag(p, "workers")
    flag(p, "amp")
    flag(p, "engine")
    flag(p, "device")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and report how many")
    flag(p, "out_dir", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--report", action="store_true", help="also write a self-contained HTML report")
    p.set_defaults(func="_evaluate")

    p = sub.add_parser("predict", help="top-k classes for an image or a folder of images")
    p.add_argument("model", help=f"checkpoint, run directory (uses {RunDir.BEST}), or exported .onnx file")
    p.add_argument("target", help="image file or folder")
    flag(p, "engine")
    flag(p, "top_k")
    flag(p, "batch_size", note="1 for the lowest latency")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--graph-opt", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimisation level (default: all)")  # fmt: skip
    flag(p, "device")
    p.add_argument("--sr-model", help="super-resolution checkpoint (finegrain sr train) to enlarge small images")
    p.add_argument("--sr-below", type=int, default=160, help="enlarge images whose shorter side is below this (160)")
    p.add_argument("--class-info", help="class_info folder: also score its classes the model was not trained on, "
                   "from their attributes / description / reference image (textprior models)")  # fmt: skip
    out = p.add_mutually_exclusive_group()
    flag(out, "json")
    out.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(func="_predict")


def _export_commands(sub) -> None:
    """export, prune and explain: files made from a trained model."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX (class names and preprocessing embedded)")
    flag(p, "checkpoint")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--class-info", help="first add this class_info folder's new classes (textprior), baked in")
    p.add_argument("--int8", action="store_true", help="also write a post-training int8 model (*.int8.onnx)")
    flag(p, "calib_images")
    flag(p, "data", default=None, help="dataset for calibration (default: the checkpoint's)")
    flag(p, "int8_target")
    p.add_argument("--min-agreement", type=float, help="least int8-vs-fp32 top-1 agreement on held-out training "
                   "images; below it no int8 file is written (default: 0.95)")  # fmt: skip
    p.set_defaults(func="_export")

    p = sub.add_parser("prune", help="structured channel pruning (then fine-tuning)")
    flag(p, "checkpoint")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of expansion channels to remove (0.3)")
    importance = "activation (default): each channel's share of its block's output on training images"
    p.add_argument("--importance", default="activation", choices=["activation", "magnitude", "taylor"], help=importance)
    p.add_argument("--out", help="pruned checkpoint (default: <checkpoint>.pruned<R>.pt)")
    p.add_argument("--epochs", type=int, default=0, help="fine-tune this many epochs after pruning (0: don't)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (1e-4)")
    flag(p, "run_dir")
    p.set_defaults(func="_prune")

    p = sub.add_parser("explain", help="heat-map of where the model looked, with the top classes, as PNG")
    p.add_argument("model", help="checkpoint, run directory (Grad-CAM) or exported .onnx file (occlusion)")
    p.add_argument("target", help="image file or folder (every image under it)")
    flag(p, "out_dir", default="explanations")
    flag(p, "top_k")
    flag(p, "batch_size", default=16)
    flag(p, "device")
    p.set_defaults(func="_explain")


def _serve_command(sub) -> None:
    """serve: the REST API and web page, and its limits against slow or hostile clients."""
    p = sub.add_parser("serve", help="REST API and web page (FastAPI + uvicorn)")
    p.add_argument("model", help="checkpoint, run directory or exported .onnx file (int8 is fastest on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch", type=int, default=4, help="images per forward pass; 1 turns batching off (4)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up (5 ms)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest accepted request body (10 MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image area (40M)")
    p.add_argument("--max-aspect", type=float, default=MAX_ASPECT,
                   help=f"largest accepted ratio of an image's long to short side ({MAX_ASPECT:g})")  # fmt: skip
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    flag(p, "device", note="for checkpoints")
    p.add_argument("--max-inflight", type=int, default=64, help="uploads in progress before 503 + Retry-After (64)")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections before 503 (1024)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a request's headers (10)")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=128,
        help="connections still sending their headers, all clients; past it the oldest is closed (128)",
    )
    p.add_argument("--max-waiting-per-client", type=int, default=64,
                   help="the same, per client address (64)")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=30.0, help="longest pause inside a request body, s (30)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    p.add_argument("--class-info", help="class_info folder: also serve its classes the checkpoint was not trained "
                   "on (textprior checkpoints)")  # fmt: skip
    p.set_defaults(func="_serve")


def _adapt_commands(sub) -> None:
    """qat, pretrain, sr and classes: adapting a model or its inputs."""
    p = sub.add_parser(
        "qat", help="quantization-aware fine-tuning, then int8 ONNX export",
        description="Fine-tune a checkpoint while simulating ONNX Runtime's int8 rounding (BN-folded per-channel "
        "weights, calibrated uint8 activations), then export best.onnx and best.int8.onnx in the new run directory.",
    )  # fmt: skip
    flag(p, "checkpoint")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (1)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate, small: the weights only adapt (1e-5)")
    flag(p, "batch_size", default=None, help="batch size (default: the checkpoint's)")
    flag(p, "calib_images")
    flag(p, "run_dir")
    flag(p, "int8_target")
    p.set_defaults(func="_qat")

    p = sub.add_parser(
        "pretrain", help="short self-supervised adaptation of the backbone to unlabelled in-domain images (SimSiam)",
        description="SimSiam from the ImageNet weights on a folder (or CSV) of unlabelled images; writes "
        "OUT/backbone.pth for `finegrain train --weights`. Measured gains are in docs/labels.md: check them first.",
    )  # fmt: skip
    p.add_argument("images", help="folder of images, or a CSV of image paths")
    flag(p, "out_dir", default="runs/pretrain")
    flag(p, "backbone")
    p.add_argument("--epochs", type=int, default=2, help="(default: 2)")
    flag(p, "batch_size")
    p.add_argument("--lr", type=float, default=0.05, help="base rate, scaled by batch-size/256 (default: 0.05)")
    p.add_argument("--time-limit", type=float, help="minutes after which it stops (the backbone so far is kept)")
    p.add_argument("--adapt-stages", type=int, default=2, help="the backbone's last stages that adapt, BatchNorm "
                   "statistics frozen, at a tenth of the rate (default: 2; 0: the whole backbone)")  # fmt: skip
    flag(p, "workers")
    flag(p, "device")
    flag(p, "seed")
    p.set_defaults(func="_pretrain")

    sr = sub.add_parser("sr", help="learned super-resolution").add_subparsers(dest="sr_command", required=True)
    p = sr.add_parser(
        "train", help="train a x2/x4 super-resolution model on a dataset's training images",
        description="Cut patches from the training images, reduce them by --scale and learn to restore them; report "
        "PSNR against bicubic upscaling on held-out (validation) images. Writes RUN_DIR/sr.pt.",
    )  # fmt: skip
    p.add_argument("data", help="dataset folder or CSV manifest")
    p.add_argument("--scale", type=int, default=2, choices=[2, 3, 4], help="(default: 2)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (2000)")
    flag(p, "batch_size", default=16)
    p.add_argument("--patch", type=int, default=96, help="high-resolution patch side in pixels (96)")
    p.add_argument("--lr", type=float, default=1e-3, help="(default: 1e-3)")
    p.add_argument("--max-images", type=int, default=400, help="training images kept in memory (400)")
    p.add_argument("--eval-images", type=int, default=50, help="held-out images for PSNR (50)")
    flag(p, "format", choices=FORMATS)
    flag(p, "seed")
    flag(p, "run_dir", default="runs/sr")
    p.set_defaults(func="_sr_train")
    p = sr.add_parser("upscale", help="enlarge images with a trained super-resolution model")
    p.add_argument("model", help="sr.pt or its run directory")
    p.add_argument("target", help="image file or folder")
    flag(p, "out_dir", default="upscaled")
    p.set_defaults(func="_sr_upscale")

    classes = sub.add_parser("classes", help="add classes to a trained model").add_subparsers(
        dest="classes_command", required=True
    )
    p = classes.add_parser(
        "add", help="add new classes from words and a reference photo each (class_info folder)",
        description="Add the classes of a class_info folder (CLASS.jpg reference photo, CLASS.txt / classes.csv "
        "words) to a model trained with the default head; refuses, exit 2, if the known classes would lose more "
        "than --max-loss points of top-1 on their validation photos.",
    )  # fmt: skip
    flag(p, "checkpoint")
    p.add_argument("class_info", help="class_info folder describing the new classes (and, for words, the known)")
    p.add_argument("--out", help="output checkpoint (default: STEM_added_classes.pt beside the checkpoint)")
    flag(p, "data", default=None, help="the training data, where it moved (default: the checkpoint's)")
    p.add_argument("--max-loss", type=float, default=3.0,
                   help="known-class top-1 points it may cost (3); the gate aims a point under it")  # fmt: skip
    flag(p, "json")
    p.set_defaults(func="_classes_add")


def _data_commands(sub) -> None:
    """data (check, audit, shard, suggest), env and models."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="classes, counts, sizes, bad files, duplicates and leaks")
    p.add_argument("path", help="dataset folder or CSV manifest")
    flag(p, "format", choices=FORMATS)
    flag(p, "val_fraction", default=0.0)
    flag(p, "test_fraction")
    flag(p, "seed")
    flag(p, "class_info", help="class_info folder to report on (default: PATH/class_info when it exists)")
    p.add_argument("--follow-symlinks", action="store_true", help="read class folders linked from outside the data")
    flag(p, "json")
    p.set_defaults(func="_data_check")

    p = data.add_parser("audit", help="images whose label is probably wrong (out-of-fold probe + confident learning)")
    p.add_argument("path", help="dataset folder or CSV manifest")
    flag(p, "format", choices=FORMATS)
    flag(p, "test_fraction", note="held out, not audited")
    p.add_argument("--folds", type=int, default=5, help="each image is scored by a probe fitted on the others (5)")
    flag(p, "seed")
    flag(
        p, "out_dir", default="audit", help=f"folder for {RunDir.LABEL_ISSUES} / .html and audit.json (default: audit)"
    )
    flag(p, "cache_dir")
    flag(p, "device")
    p.set_defaults(func="_data_audit")

    p = data.add_parser("shard", help="write a dataset as WebDataset tar shards (images as stored, labels, split)")
    p.add_argument("source", help="dataset folder or CSV manifest")
    p.add_argument("out", help="new folder for the shards and their _info.json")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000)")
    flag(p, "format", choices=FORMATS)
    flag(p, "val_fraction", note="the split is made now, as train would")
    flag(p, "test_fraction")
    flag(p, "seed", note="the split's: use the seed you train with")
    p.set_defaults(func="_data_shard")

    p = data.add_parser("suggest", help="which unlabelled images to label next (uncertain and unlike the labelled)")
    p.add_argument("run", help=f"run folder (its {RunDir.BEST}) or a checkpoint")
    p.add_argument("--unlabeled", required=True, help="folder of unlabelled images, or a CSV of image paths")
    p.add_argument("--n", type=int, default=100, help="how many images to suggest (100)")
    p.add_argument("--out", default="suggest.csv", help="CSV to write, with an empty label column (suggest.csv)")
    flag(p, "cache_dir")
    flag(p, "device")
    p.set_defaults(func="_data_suggest")

    p = sub.add_parser("env", help="what finegrain sees on this machine and the precision/runtime it picks")
    flag(p, "json")
    p.set_defaults(func="_env")

    p = sub.add_parser("models", help="list the registered methods")
    p.set_defaults(func="_models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finegrain", description="Fine-grained image classification.")
    parser.add_argument("--version", action="version", version=f"finegrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _model_commands(sub)
    _export_commands(sub)
    _serve_command(sub)
    _adapt_commands(sub)
    _data_commands(sub)
    return parser


def _clean_message(e: Exception) -> str:
    """DataLoader workers wrap errors with their traceback: keep the finegrain message only."""
    text = str(e)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_output_options(parser)
    args = parser.parse_args(argv)
    set_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        configure_threads()
        handler = getattr(importlib.import_module(HANDLERS), args.func)  # heavy: only a command runs it
        return handler(args)
    except FinegrainError as e:
        print(f"finegrain: error: {_clean_message(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `finegrain models | head`: the reader left; say nothing, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout again at exit
        return 0
    except OSError as e:  # the one place where file-system failures become messages (read-only, full, missing)
        where = f" '{e.filename}'" if e.filename else ""
        print(f"finegrain: error: cannot access{where}: {e.strerror or e}. Check the path and its permissions "
              "(or free disk space), then run the command again.", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("finegrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
