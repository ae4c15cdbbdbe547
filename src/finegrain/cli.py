"""The ``finegrain`` command line: train, evaluate, predict, explain, export, prune, serve, data check."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finegrain import __version__
from finegrain.atomic import write_text
from finegrain.compress.recipes import prune_and_finetune, qat_finetune
from finegrain.config import DEFAULT_BACKBONE, TrainConfig, default_cache_dir
from finegrain.data import list_images, load_dataset
from finegrain.data.check import check_dataset
from finegrain.data.class_info import find_class_info, load_class_info
from finegrain.data.datasets import FORMATS
from finegrain.data.loading import MAX_ASPECT, open_image
from finegrain.data.shards import write_shards
from finegrain.engine.audit import audit_labels, write_audit_csv
from finegrain.engine.pretrain import pretrain
from finegrain.engine.recipe import train_within_budget
from finegrain.engine.setup import run_dir_for
from finegrain.engine.sr import load_sr, train_sr
from finegrain.engine.suggest import suggest_labels
from finegrain.engine.train import fit
from finegrain.engine.tune import tune
from finegrain.env import AMP_CHOICES, INT8_TARGETS, configure_threads, describe
from finegrain.errors import FinegrainError
from finegrain.escape import csv_cell
from finegrain.explain import explain
from finegrain.export import OnnxRunner
from finegrain.export.quantize import export_checkpoint
from finegrain.models import list_models
from finegrain.models.registry import describe_model
from finegrain.models.sr import sr_upscale
from finegrain.predict import Predictor, model_for_engine, with_added_classes
from finegrain.progress import progress_bar, say, set_verbosity
from finegrain.report.audit_page import write_audit_page
from finegrain.report.evaluation import after_evaluation, evaluate_checkpoint
from finegrain.serve.app import ServeSettings, create_app
from finegrain.serve.server import run

ENGINES = ("auto", "torch", "onnx")
ENGINE_HELP = (
    "auto: an .onnx file runs in ONNX Runtime; a checkpoint runs in whichever of PyTorch and ONNX Runtime measured "
    "faster on this machine (checked for equal logits, remembered beside the checkpoint); torch; onnx (default: auto)"
)


def _add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``TrainConfig`` option, its help and parsing from the option's own field (no second copy)."""
    for group, f in TrainConfig.options():
        if f.name in skip:
            continue
        default = TrainConfig.option_default(f)
        kw = dict(f.metadata["cli"])
        kw["help"] = f"{f.metadata['help']} (default: {default}; group {group})"
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw and not kw.get("nargs"):
            kw["type"] = type(default) if isinstance(default, int | float) else str
        if "action" not in kw and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = f.name.upper()
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kw)


def _help(name: str) -> str:
    return next(f.metadata["help"] for _, f in TrainConfig.options() if f.name == name)


def _overrides(args: argparse.Namespace) -> dict:
    """The training options given on the command line, by name."""
    names = {f.name for _, f in TrainConfig.options()}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if "model_kwargs" in overrides:
        overrides["model_kwargs"] = dict(overrides["model_kwargs"])
    return overrides


def _config(args: argparse.Namespace) -> TrainConfig:
    """--config, then the command line's options on top."""
    return (TrainConfig.from_yaml(args.config) if args.config else TrainConfig()).replace(**_overrides(args))


def _train(args: argparse.Namespace) -> int:
    if args.resume:
        epochs = _overrides(args).get("epochs")
        run_dir = fit(TrainConfig().replace(epochs=epochs) if epochs else None, resume=args.resume).run_dir
    else:
        cfg = _config(args)
        cfg = cfg.replace(run_dir=str(run_dir_for(cfg)))
        made = [d for d in (Path(cfg.run.run_dir), *Path(cfg.run.run_dir).parents) if not d.exists()]
        try:
            run_dir = (train_within_budget(cfg) if cfg.recipe.budget else fit(cfg)).run_dir
        except FinegrainError:  # a run that failed before writing anything leaves no folder behind
            for folder in made:  # (the run folder, then the parents it created, while empty)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    say(f"run directory: {run_dir}  (best checkpoint: {Path(run_dir) / 'best.pt'})")
    return 0


def _tune(args: argparse.Namespace) -> int:
    base = _config(args)
    r = tune(base, args.study_dir, args.budget, args.trials, seed=base.run.seed)
    print(f"best: trial {r['trial']} ({r['kind']}), validation top-1 {100 * r['val_top1']:.2f}% after {r['trials']} "
          f"trial(s); train it: finegrain train --config {r['best_yaml']}")  # fmt: skip
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    model = _model_for_engine(args.checkpoint, args.engine, args.device)
    runner = OnnxRunner(model) if Path(model).suffix == ".onnx" else None
    r = evaluate_checkpoint(
        args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size, workers=args.workers,
        amp=args.amp, device=args.device, skip_bad=args.skip_bad, out_dir=args.out, report=args.report, runner=runner,
    )  # fmt: skip
    print(
        f"{args.split}: {r['n']} images  top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
        f"mean per-class {100 * r['mean_class_acc']:.2f}%  ({r['seconds']:.0f}s)"
    )
    if r["skipped_bad"]:
        print(f"skipped {r['skipped_bad']} unreadable image(s) (--skip-bad)")
    out = Path(args.out or Path(r["checkpoint"]).parent)
    say(f"written: {out / f'eval_{args.split}.json'}")
    if args.report:
        say(f"report: {r['report']}")
    say(f"model card: {after_evaluation(r, out, args.split)}")
    return 0


def _model_for_engine(model: str, engine: str, device: str) -> str:
    path, why = model_for_engine(model, engine, device)
    if engine == "auto" and Path(model).suffix != ".onnx":
        say(f"engine: {why}", stderr=True)
    return path


def _predict(args: argparse.Namespace) -> int:
    # classes are added to the PyTorch model (their embeddings and reference images go through it)
    model = args.model if args.class_info else _model_for_engine(args.model, args.engine, args.device)
    predictor = Predictor.load(model, device=args.device, threads=args.threads, graph_opt=args.graph_opt)
    if args.class_info:
        added = predictor.add_classes(args.class_info)
        print(f"added {len(added)} class(es) known only by {args.class_info}: {', '.join(added[:8])}"
              + (" ..." if len(added) > 8 else ""), file=sys.stderr)  # fmt: skip
    if args.sr_model:
        predictor.upscale_small_inputs(args.sr_model, args.sr_below)
    results = predictor.predict_files(list_images(args.target), k=args.topk, batch_size=args.batch_size, skip_bad=True)
    bad = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "class", "prob"])
        for r in results:
            writer.writerows([csv_cell(r["path"]), i + 1, csv_cell(t["class"]), f"{t['prob']:.6f}"]
                             for i, t in enumerate(r["top"]))  # fmt: skip
    else:
        table = Table("image", "rank", "class", "probability")
        for r in results:
            for i, t in enumerate(r["top"]):
                table.add_row(Path(r["path"]).name if i == 0 else "", str(i + 1), t["class"], f"{t['prob']:.3f}")
        Console().print(table)
    for r in bad:
        print(f"finegrain: error: cannot read image '{r['path']}': {r['error']}", file=sys.stderr)
    if bad:
        message = f"finegrain: {len(bad)} of {len(bad) + len(results)} image(s) could not be read (listed above)"
        print(message + "; the others were predicted. Fix or remove them.", file=sys.stderr)
        return 2
    return 0


def _png_destination(target: str, file: Path, out_dir: str) -> Path:
    """Where a per-image PNG goes: ``out_dir`` mirrors the input folder's layout (folders created)."""
    root = Path(target) if Path(target).is_dir() else Path(target).parent
    dest = (Path(out_dir) / file.relative_to(root)).with_suffix(".png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _explain(args: argparse.Namespace) -> int:

    predictor = Predictor.load(args.model, device=args.device)
    files = list_images(args.target)

    for i in progress_bar(range(0, len(files), args.batch_size), desc="explain", disable=len(files) <= args.batch_size):
        chunk = files[i : i + args.batch_size]
        images = [open_image(f) for f in chunk]
        for f, img, e in zip(chunk, images, explain(predictor, images, args.topk), strict=True):
            dest = _png_destination(args.target, f, args.out)
            e.picture(img, predictor).save(dest)
            because = ", ".join(f"{a['name']} ({a['contribution']:+.3f})" for a in e.evidence)
            print(f"{dest}  {e.top[0]['class']} ({100 * e.top[0]['prob']:.1f}%, {e.method})"
                  + (f"; attributes that drove it: {because}" if because else ""))  # fmt: skip
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
        max_pixels=args.max_pixels, max_aspect=args.max_aspect, threads=args.threads, device=args.device,
        max_inflight=args.max_inflight, body_timeout_s=args.body_timeout, class_info=args.class_info,
    )  # fmt: skip
    app = create_app(args.model, settings)
    print(f"finegrain serving {args.model} on http://{args.host}:{args.port}/  (API docs: /docs)")
    run(app, args.host, args.port, args.log_level, header_timeout=args.header_timeout,
        max_connections=args.max_connections, max_waiting=args.max_waiting,
        max_waiting_per_client=args.max_waiting_per_client)  # fmt: skip
    return 0


def _data_audit(args: argparse.Namespace) -> int:
    index = load_dataset(args.path, args.format, 0.0, args.test_fraction, args.seed)
    issues, summary = audit_labels(index, args.folds, args.seed, args.cache_dir, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_audit_csv(issues, index, out / "label_issues.csv")
    page = write_audit_page(issues, index, summary, out / "label_issues.html")
    write_text(out / "audit.json", json.dumps(summary, indent=2))
    print(f"{summary['flagged']} of {summary['images']} labelled images look mislabelled (out-of-fold top-1 "
          f"{100 * summary['out_of_fold_top1']:.1f}%): {out / 'label_issues.csv'}, {page}.")  # fmt: skip
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    index = load_dataset(args.source, args.format, args.val_fraction, args.test_fraction, args.seed)
    info = write_shards(index, args.out, args.shard_size)
    counts = ", ".join(
        f"{sp} {v['num_samples']} images in {len(v['filenames'])} shard(s)" for sp, v in info["splits"].items()
    )
    print(f"wrote {args.out}: {counts}; train on it with --data {args.out}")
    return 0


def _data_suggest(args: argparse.Namespace) -> int:
    run = Path(args.run)
    ckpt = run / "best.pt" if run.is_dir() else run
    rows = suggest_labels(ckpt, args.unlabeled, args.n, args.out, args.cache_dir, args.device)
    print(f"{len(rows)} image(s) to label next, most useful first: {args.out} (fill in its label column)")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    index = load_dataset(args.path, args.format, args.val_fraction, args.test_fraction, args.seed,
                         follow_symlinks=args.follow_symlinks)  # fmt: skip
    report = check_dataset(index)
    info_dir = find_class_info(args.path, args.class_info)
    if info_dir is not None:
        report.class_info = load_class_info(info_dir).coverage(index.classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    d = report.to_dict()
    print(f"{index.format} dataset '{args.path}': {d['num_classes']} classes, images per split {d['images']}")
    for sp, c in report.counts.items():
        print(f"  {sp:5s}: {min(c)}-{max(c)} images per class")
    w, h = report.sizes["width"], report.sizes["height"]
    if w:
        print(f"  image size: width {w['min']}-{w['max']} (median {w['median']:.0f}), "
              f"height {h['min']}-{h['max']} (median {h['median']:.0f})")  # fmt: skip
    for note in report.notes:
        print(f"  note: {note}")
    for path in report.outside:
        print(f"  outside the dataset folder: {path}")
    if report.class_info:
        c = report.class_info
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in c["classes_with"].items())
        print(f"  class info '{c['root']}': classes with {kinds} ({c['num_attributes']} attribute columns)")
        if c["missing"]:
            print(f"  class info: nothing for {len(c['missing'])} class(es): {', '.join(c['missing'][:8])}")
        if c["new_classes"]:
            print(f"  class info: {len(c['new_classes'])} class(es) not in the data (zero-shot classes for "
                  f"predict --class-info): {', '.join(c['new_classes'][:8])}")  # fmt: skip
    for path, reason in report.bad:
        print(f"BAD IMAGE {path}: {reason}")
    for group in report.duplicates:
        print(f"DUPLICATE files (identical bytes): {', '.join(group)}")
    for group in report.leaks:
        print(f"LEAK across train/test: {', '.join(group)}")
    verdict = "OK" if report.ok else f"{len(report.bad)} bad file(s), {len(report.leaks)} train/test leak(s)"
    print(f"result: {verdict}" + (f"; {len(report.duplicates)} duplicate group(s)" if report.duplicates else ""))
    return 0 if report.ok else 1


def _write_onnx(checkpoint, out=None, opset: int = 17, int8: bool = False, data=None, calib_images: int = 256,
                int8_target: str = "auto", min_agreement: float | None = None) -> None:  # fmt: skip
    """Export, report the check against PyTorch, and optionally write the int8 copy: `export` and `qat`."""
    r, q = export_checkpoint(checkpoint, out, opset, int8, data, calib_images, int8_target, min_agreement)
    print(f"wrote {r['path']} ({r['megabytes']:.1f} MB, opset {r['opset']}); "
          f"max |ONNX Runtime - PyTorch| logit difference {r['max_abs_diff']:.2e}")  # fmt: skip
    if q is not None:
        agree = f"; top-1 agrees with fp32 on {q['agreement']:.1%} of {q['agreement_images']} held-out training " \
            "images" if "agreement" in q else ""  # fmt: skip
        print(f"wrote {q['path']} ({q['megabytes']:.1f} MB, int8 for {q['int8_target']} CPUs, calibrated on "
              f"{q['calibration_images']} images{agree})")  # fmt: skip


def _export(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint
    if args.class_info:
        checkpoint, added = with_added_classes(checkpoint, args.class_info)
        print(f"added {len(added)} class(es) from {args.class_info}; wrote {checkpoint}")
    _write_onnx(checkpoint, args.out, args.opset, args.int8, args.data, args.calib_images, args.int8_target,
                args.min_agreement)  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    r = prune_and_finetune(args.checkpoint, args.ratio, args.epochs, args.lr, args.importance, args.out, args.run_dir)
    print(f"pruned {100 * args.ratio:.0f}% of the expansion channels: {r['params_before']:,} -> "
          f"{r['params_after']:,} parameters; wrote {r['path']}")  # fmt: skip
    if "finetuned" in r:
        print(f"fine-tuned: {r['finetuned']}")
    else:
        print(f"fine-tune it: finegrain train --init-from {r['path']} --no-freeze-backbone --epochs 3 --lr 1e-4")
    return 0


def _qat(args: argparse.Namespace) -> int:
    best = qat_finetune(args.checkpoint, args.epochs, args.lr, args.batch_size, args.calib_images, args.int8_target,
                        args.run_dir)  # fmt: skip
    print(f"QAT checkpoint {best}")
    _write_onnx(best, int8=True, calib_images=args.calib_images, int8_target=args.int8_target)
    return 0


def _sr_train(args: argparse.Namespace) -> int:
    m = train_sr(
        args.data, args.scale, args.steps, args.batch_size, args.patch, args.lr, args.max_images, args.eval_images,
        args.run_dir, args.seed, args.format,
    )  # fmt: skip
    print(f"x{args.scale} on {m['images']} held-out images: PSNR {m['psnr']:.2f} dB "
          f"(bicubic {m['psnr_bicubic']:.2f} dB); wrote {Path(args.run_dir) / 'sr.pt'}")  # fmt: skip
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    path = pretrain(args.images, args.out, args.backbone, args.epochs, args.batch_size, args.lr, args.time_limit,
                    args.workers, args.device, args.seed)  # fmt: skip
    print(f"adapted backbone: {path}. Use it with: finegrain train --backbone {args.backbone} --weights {path}")
    return 0


def _sr_upscale(args: argparse.Namespace) -> int:

    model = load_sr(args.model)
    for f in list_images(args.target):
        dest = _png_destination(args.target, f, args.out)
        img = sr_upscale(model, open_image(f))
        img.save(dest)
        print(f"{dest}  {img.width}x{img.height}")
    return 0


def _env(args: argparse.Namespace) -> int:

    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    flags = ", ".join(info["cpu_flags"]) or "none of " + "/".join(("avx2", "avx512f", "avx512_bf16", "vnni"))
    gpus = ", ".join(info["cuda_devices"]) or "none"
    detail = ", ".join(x for x in (info["cpu_family_model"], f"{info['cores']} cores", info["machine"]) if x)
    print(f"CPU            {info['cpu_model']} ({detail})")
    print(f"CPU flags      {flags}")
    caps = ", ".join(f"{k}={v}" for k, v in info["isa_caps"].items())
    print(f"torch kernels  {info['torch_cpu_capability']}" + (f" (capped: {caps})" if caps else ""))
    print(f"CUDA devices   {gpus}")
    print(
        f"finegrain      {info['finegrain']} on Python {info['python']}; extras "
        + ", ".join(f"{e} {'yes' if ok else 'no'}" for e, ok in info["extras"].items())
    )
    print(f"libraries      torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}, "
          f"onnxruntime {info['onnxruntime']} ({', '.join(info['onnxruntime_providers'])})")  # fmt: skip
    weights = [f"{p} {v}" for p, v in info["weight_packages"].items() if v]
    print(f"weights        {', '.join(weights) or 'none of ' + ', '.join(info['weight_packages'])} (offline)")
    t = info["threads"]
    print(f"threads        {t['intra_op_threads']} intra-op, {t['inter_op_threads']} inter-op; "
          f"{info['default_workers']} DataLoader worker(s)")  # fmt: skip
    why = "native bf16" if info["amp_auto"] == "bf16" else "bf16 is not native here: emulated bf16 is ~10x slower"
    print(f"training       {info['amp_auto']} on {info['device']} (--amp auto: {why})")
    vnni = "VNNI present" if info["vnni"] else "no VNNI: 7-bit weights keep int16 sums from saturating"
    print(f"int8 export    --int8-target auto = {info['int8_target_auto']} ({vnni})")
    return 0


def _models(args: argparse.Namespace) -> int:
    width = max(map(len, list_models()))
    print("\n".join(f"{m:{width}s}  {describe_model(m)}" for m in list_models()))
    return 0


def _add_int8_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8-target", default="auto", choices=INT8_TARGETS, help=_help("int8_target") + " (auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finegrain", description="Fine-grained image classification.")
    parser.add_argument("--version", action="version", version=f"finegrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a model; works under torchrun (DDP).")
    p.add_argument("--config", help="YAML file of options (command-line options override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.pt")
    _add_train_options(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "distill", help="train a student taught by one or more finegrain checkpoints (knowledge distillation)",
        description="Train like `finegrain train`, with the averaged soft labels of --teacher checkpoints "
        "(KL at temperature T, plus cross-entropy). With a frozen, cached student backbone the teachers' outputs "
        "for the fixed views are computed once and cached.",
    )  # fmt: skip
    p.add_argument("--teacher", dest="teachers", nargs="+", required=True, metavar="CKPT", help="teacher checkpoint(s)")
    p.add_argument("--config", help="YAML file of options (command-line options override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.pt")
    _add_train_options(p, skip=("teachers",))
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "tune", help="hyperparameter search within a time budget (Optuna; resumable)",
        description="Search training options on the validation split: cheap trials of the head on cached features "
        "first, then pruned fine-tuning trials while the budget allows. Writes STUDY_DIR/best.yaml (train it with "
        "`finegrain train --config best.yaml`), trials.csv, search.png and study.db (run again to resume).",
    )  # fmt: skip
    p.add_argument("--budget", type=float, required=True, help="minutes for the whole search")
    p.add_argument("--trials", type=int, default=50, help="trials in all, resumed ones included (50)")
    p.add_argument("--study-dir", default="runs/tune", help="(default: runs/tune)")
    p.add_argument("--config", help="YAML file of base options (command-line options override it)")
    _add_train_options(p, skip=("budget", "time_limit", "finetune_lr", "run_dir"))
    p.set_defaults(func=_tune)

    p = sub.add_parser("evaluate", help="top-1/top-5/per-class accuracy and confusion matrix")
    p.add_argument("checkpoint", help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="(default: test)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--workers", type=int, default=TrainConfig().speed.workers, help="DataLoader workers")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=_help("amp") + " (default: auto)")
    p.add_argument("--engine", default="auto", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and report how many")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--report", action="store_true", help="also write a self-contained HTML report")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="top-k classes for an image or a folder of images")
    p.add_argument("model", help="checkpoint, run directory (uses best.pt), or exported .onnx file")
    p.add_argument("target", help="image file or folder")
    p.add_argument("--engine", default="auto", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--topk", type=int, default=5, help="(default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32; 1 for the lowest latency)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--graph-opt", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimisation level (default: all)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--sr-model", help="super-resolution checkpoint (finegrain sr train) to enlarge small images")
    p.add_argument("--sr-below", type=int, default=160, help="enlarge images whose shorter side is below this (160)")
    p.add_argument("--class-info", help="class_info folder: also score its classes the model was not trained on, "
                   "from their attributes / description / reference image (textprior models)")  # fmt: skip
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON output")
    out.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (class names and preprocessing embedded)")
    p.add_argument("checkpoint", help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--class-info", help="first add this class_info folder's new classes (textprior), baked in")
    p.add_argument("--int8", action="store_true", help="also write a post-training int8 model (*.int8.onnx)")
    p.add_argument("--calib-images", type=int, default=256, help="training images for int8 calibration (256)")
    p.add_argument("--data", help="dataset for calibration (default: the checkpoint's)")
    _add_int8_target(p)
    p.add_argument("--min-agreement", type=float, help="least int8-vs-fp32 top-1 agreement on held-out training "
                   "images; below it no int8 file is written (default: 0.95)")  # fmt: skip
    p.set_defaults(func=_export)

    p = sub.add_parser("prune", help="structured channel pruning (then fine-tuning)")
    p.add_argument("checkpoint", help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of expansion channels to remove (0.3)")
    importance = "activation (default): each channel's share of its block's output on training images"
    p.add_argument("--importance", default="activation", choices=["activation", "magnitude", "taylor"], help=importance)
    p.add_argument("--out", help="pruned checkpoint (default: <checkpoint>.pruned<R>.pt)")
    p.add_argument("--epochs", type=int, default=0, help="fine-tune this many epochs after pruning (0: don't)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (1e-4)")
    p.add_argument("--run-dir", help="fine-tuning run directory (default runs/<method>-<time>)")
    p.set_defaults(func=_prune)

    p = sub.add_parser("explain", help="heat-map of where the model looked, with the top classes, as PNG")
    p.add_argument("model", help="checkpoint, run directory (Grad-CAM) or exported .onnx file (occlusion)")
    p.add_argument("target", help="image file or folder (every image under it)")
    p.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    p.add_argument("--topk", type=int, default=5, help="(default: 5)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=_explain)

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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda for checkpoints (default: auto)")
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
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "qat", help="quantization-aware fine-tuning, then int8 ONNX export",
        description="Fine-tune a checkpoint while simulating ONNX Runtime's int8 rounding (BN-folded per-channel "
        "weights, calibrated uint8 activations), then export best.onnx and best.int8.onnx in the new run directory.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint file or run directory (uses best.pt)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (1)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate, small: the weights only adapt (1e-5)")
    p.add_argument("--batch-size", type=int, help="(default: the checkpoint's)")
    p.add_argument("--calib-images", type=int, default=256, help="training images for activation ranges (256)")
    p.add_argument("--run-dir", help="output run directory (default runs/<method>-<time>)")
    _add_int8_target(p)
    p.set_defaults(func=_qat)

    p = sub.add_parser(
        "pretrain", help="short self-supervised adaptation of the backbone to unlabelled in-domain images (SimSiam)",
        description="SimSiam from the ImageNet weights on a folder (or CSV) of unlabelled images; writes "
        "OUT/backbone.pth for `finegrain train --weights`. Measured gains are in docs/labels.md: check them first.",
    )  # fmt: skip
    p.add_argument("images", help="folder of images, or a CSV of image paths")
    p.add_argument("--out", default="runs/pretrain", help="(default: runs/pretrain)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm backbone (default: {DEFAULT_BACKBONE})")
    p.add_argument("--epochs", type=int, default=2, help="(default: 2)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="base rate, scaled by batch-size/256 (default: 0.05)")
    p.add_argument("--time-limit", type=float, help="minutes after which it stops (the backbone so far is kept)")
    p.add_argument("--workers", type=int, default=2, help="(default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pretrain)

    sr = sub.add_parser("sr", help="learned super-resolution").add_subparsers(dest="sr_command", required=True)
    p = sr.add_parser(
        "train", help="train a x2/x4 super-resolution model on a dataset's training images",
        description="Cut patches from the training images, reduce them by --scale and learn to restore them; report "
        "PSNR against bicubic upscaling on held-out (validation) images. Writes RUN_DIR/sr.pt.",
    )  # fmt: skip
    p.add_argument("data", help="dataset folder or CSV manifest")
    p.add_argument("--scale", type=int, default=2, choices=[2, 3, 4], help="(default: 2)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (2000)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    p.add_argument("--patch", type=int, default=96, help="high-resolution patch side in pixels (96)")
    p.add_argument("--lr", type=float, default=1e-3, help="(default: 1e-3)")
    p.add_argument("--max-images", type=int, default=400, help="training images kept in memory (400)")
    p.add_argument("--eval-images", type=int, default=50, help="held-out images for PSNR (50)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/sr", help="(default: runs/sr)")
    p.set_defaults(func=_sr_train)
    p = sr.add_parser("upscale", help="enlarge images with a trained super-resolution model")
    p.add_argument("model", help="sr.pt or its run directory")
    p.add_argument("target", help="image file or folder")
    p.add_argument("--out", default="upscaled", help="output folder (default: upscaled)")
    p.set_defaults(func=_sr_upscale)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="classes, counts, sizes, bad files, duplicates and leaks")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--val-fraction", type=float, default=0.0, help="(default: 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="when there is no test split (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-info", help="class_info folder to report on (default: PATH/class_info when it exists)")
    p.add_argument("--follow-symlinks", action="store_true", help="read class folders linked from outside the data")
    p.add_argument("--json", action="store_true", help="JSON report")
    p.set_defaults(func=_data_check)

    p = data.add_parser("audit", help="images whose label is probably wrong (out-of-fold probe + confident learning)")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out (not audited) when there is no test "
                   "split (default 0.2)")  # fmt: skip
    p.add_argument("--folds", type=int, default=5, help="each image is scored by a probe fitted on the others (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="audit", help="folder for label_issues.csv / .html and audit.json (audit)")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="feature cache (default: finegrain's cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=_data_audit)

    p = data.add_parser("shard", help="write a dataset as WebDataset tar shards (images as stored, labels, split)")
    p.add_argument("source", help="dataset folder or CSV manifest")
    p.add_argument("out", help="new folder for the shards and their _info.json")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--val-fraction", type=float, default=0.1, help="the split is made now, as train would (0.1)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="when there is no test split (0.2)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed: use the seed you train with (0)")
    p.set_defaults(func=_data_shard)

    p = data.add_parser("suggest", help="which unlabelled images to label next (uncertain and unlike the labelled)")
    p.add_argument("run", help="run folder (its best.pt) or a checkpoint")
    p.add_argument("--unlabeled", required=True, help="folder of unlabelled images, or a CSV of image paths")
    p.add_argument("--n", type=int, default=100, help="how many images to suggest (100)")
    p.add_argument("--out", default="suggest.csv", help="CSV to write, with an empty label column (suggest.csv)")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="feature cache (default: finegrain's cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=_data_suggest)

    p = sub.add_parser("env", help="what finegrain sees on this machine and the precision/runtime it picks")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=_env)

    p = sub.add_parser("models", help="list the registered methods")
    p.set_defaults(func=_models)
    return parser


def _clean_message(e: Exception) -> str:
    """DataLoader workers wrap errors with their traceback: keep the finegrain message only."""
    text = str(e)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-q``/``-v`` on every command and sub-command (declared once, here)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for command in action.choices.values():
            if command._subparsers is not None:
                _add_output_options(command)
            else:
                group = command.add_argument_group("output")
                group.add_argument("-q", "--quiet", action="store_true", help="print only errors")
                group.add_argument("-v", "--verbose", action="store_true", help="also the library's debug log")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_output_options(parser)
    args = parser.parse_args(argv)
    set_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", False))
    configure_threads()
    try:
        return args.func(args)
    except FinegrainError as e:
        print(f"finegrain: error: {_clean_message(e)}", file=sys.stderr)
        return 2
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
