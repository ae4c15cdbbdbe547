"""What each ``finegrain`` command does, given its parsed arguments (``finegrain.cli`` declares the arguments
and dispatches here): one function per command, returning the exit code."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finegrain.atomic import write_text
from finegrain.compress.recipes import prune_and_finetune, qat_finetune
from finegrain.config import TrainConfig
from finegrain.data import list_images, load_dataset
from finegrain.data.check import check_dataset
from finegrain.data.class_info import find_class_info, load_class_info
from finegrain.data.loading import open_image
from finegrain.data.shards import write_shards
from finegrain.engine.add_classes import add_classes
from finegrain.engine.audit import write_audit_csv
from finegrain.engine.recipe import train as train_recipe
from finegrain.engine.setup import run_dir_for
from finegrain.engine.sr import load_sr, train_sr
from finegrain.engine.train import fit
from finegrain.engine.tune import tune
from finegrain.env import describe, process_age_s
from finegrain.errors import FinegrainError
from finegrain.escape import csv_cell
from finegrain.explain import explain
from finegrain.export import OnnxRunner
from finegrain.export.quantize import export_checkpoint
from finegrain.extras import need
from finegrain.labels.audit import audit_labels
from finegrain.labels.pretrain import pretrain
from finegrain.labels.suggest import suggest_labels
from finegrain.models import list_models
from finegrain.models.registry import describe_model
from finegrain.models.sr import sr_upscale
from finegrain.predict import Predictor, model_for_engine, with_added_classes
from finegrain.progress import progress_bar, say
from finegrain.report.audit_page import write_audit_page
from finegrain.report.evaluation import after_evaluation, evaluate_checkpoint
from finegrain.run_layout import RunDir

try:  # the web service is the 'serve' extra: without it every other command still runs
    from finegrain.serve.app import ServeSettings, create_app
    from finegrain.serve.server import run
except ImportError:
    ServeSettings = create_app = run = None


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


def _given(args: argparse.Namespace) -> set[str]:
    """The training options the user set, on the command line or in --config."""
    return set(_overrides(args)) | (TrainConfig.names_in_yaml(args.config) if args.config else set())


def _train(args: argparse.Namespace) -> int:
    if args.resume:
        epochs = _overrides(args).get("epochs")
        run_dir = fit(TrainConfig().replace(epochs=epochs) if epochs else None, resume=args.resume).run_dir
    else:
        cfg = _config(args)
        cfg = cfg.replace(run_dir=str(run_dir_for(cfg)))
        made = [d for d in (Path(cfg.run.run_dir), *Path(cfg.run.run_dir).parents) if not d.exists()]
        try:
            run_dir = train_recipe(cfg, _given(args), started=time.perf_counter() - process_age_s()).run_dir
        except FinegrainError:  # a run that failed before writing anything leaves no folder behind
            stages = sorted(made[0].glob("**/"), reverse=True) if made else []  # a recipe's empty stage folders
            for folder in [*stages, *made]:  # (then the run folder, then the parents it created, while empty)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    say(f"run directory: {run_dir}  (best checkpoint: {RunDir(run_dir).best})")
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
    need("plots", "finegrain explain")
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
    need("serve", "finegrain serve")
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
    write_audit_csv(issues, index, out / RunDir.LABEL_ISSUES)
    page = write_audit_page(issues, index, summary, out / "label_issues.html")
    write_text(out / "audit.json", json.dumps(summary, indent=2))
    print(f"{summary['flagged']} of {summary['images']} labelled images look mislabelled (out-of-fold top-1 "
          f"{100 * summary['out_of_fold_top1']:.1f}%): {out / RunDir.LABEL_ISSUES}, {page}.")  # fmt: skip
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
    ckpt = run / RunDir.BEST if run.is_dir() else run
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


def _classes_add(args: argparse.Namespace) -> int:
    r = add_classes(args.checkpoint, args.class_info, args.out, args.data, args.max_loss)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    cal = r["calibration"]
    say(f"added {len(r['added'])} class(es): {', '.join(r['added'][:10])}{' ...' if len(r['added']) > 10 else ''}")
    say(f"scored from {'words and ' if r['words'] else ''}{len(r['photos'])} reference photo(s); calibrated on "
        f"{cal['pseudo']['splits']:.0f} pseudo-splits of the known classes (photo weight {cal['beta']:g}; the gate "
        f"may send {cal['known_share']:.1%} of known photos to a new class)")  # fmt: skip
    if "known_val_before" in r:
        say(f"known classes on their {r['known_val_photos']} validation photos: top-1 {r['known_val_before']:.1f}% "
            f"-> {r['known_val_after']:.1f}%")  # fmt: skip
    print(r["path"])
    return 0


def _export(args: argparse.Namespace) -> int:
    need("export", "finegrain export")
    checkpoint = args.checkpoint
    if args.class_info:
        checkpoint, added = with_added_classes(checkpoint, args.class_info)
        print(f"added {len(added)} class(es) from {args.class_info}; wrote {checkpoint}")
    _write_onnx(checkpoint, args.out, args.opset, args.int8, args.data, args.calib_images, args.int8_target,
                args.min_agreement)  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    need("export", "finegrain prune")
    r = prune_and_finetune(args.checkpoint, args.ratio, args.epochs, args.lr, args.importance, args.out, args.run_dir)
    print(f"pruned {100 * args.ratio:.0f}% of the expansion channels: {r['params_before']:,} -> "
          f"{r['params_after']:,} parameters; wrote {r['path']}")  # fmt: skip
    if "finetuned" in r:
        print(f"fine-tuned: {r['finetuned']}")
    else:
        print(f"fine-tune it: finegrain train --init-from {r['path']} --no-freeze-backbone --epochs 3 --lr 1e-4")
    return 0


def _qat(args: argparse.Namespace) -> int:
    need("export", "finegrain qat (it exports int8 ONNX)")
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
                    args.workers, args.device, args.seed, args.adapt_stages)  # fmt: skip
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
    print(f"threads        {t['intra_op_threads']} intra-op ({t['head_on_cached_features']} for a head on cached "
          f"features), {t['inter_op_threads']} inter-op; "
          f"{info['default_workers']} DataLoader worker(s); OpenMP waiting: {t['omp_wait_policy']}")  # fmt: skip
    why = "native bf16" if info["amp_auto"] == "bf16" else "bf16 is not native here: emulated bf16 is ~10x slower"
    print(f"training       {info['amp_auto']} on {info['device']} (--amp auto: {why})")
    vnni = "VNNI present" if info["vnni"] else "no VNNI"
    print(f"int8 export    --int8-target auto = {info['int8_target_auto']} ({vnni}; a portable file computes the same "
          "numbers on every x86 CPU)")  # fmt: skip
    return 0


def _models(args: argparse.Namespace) -> int:
    width = max(map(len, list_models()))
    print("\n".join(f"{m:{width}s}  {describe_model(m)}" for m in list_models()))
    return 0
