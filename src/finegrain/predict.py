"""Prediction from a checkpoint alone: no dataset, no download; the training-time eval preprocessing."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

from finegrain.atomic import write_text
from finegrain.checkpoint import Checkpoint
from finegrain.data.class_info import load_class_info
from finegrain.data.loading import as_image, open_image
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.engine.distributed import resolve_device
from finegrain.engine.sr import load_sr
from finegrain.env import cpu_model, physical_cores, resolve_amp
from finegrain.errors import BadImageError, ConfigError, DataError
from finegrain.export import OnnxRunner, export_onnx
from finegrain.extras import has
from finegrain.models.base import no_class_prior
from finegrain.models.class_embed import embed_classes
from finegrain.models.sr import SRUpscaleSmall


def images_per_second(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int = 3, seconds: float = 0
) -> float:
    """``len(x)`` over the best of at least ``repeats`` timed calls ``fn(x)`` (and for at least ``seconds``), after
    one warm-up call (ONNX Runtime's first run allocates; PyTorch picks its kernels)."""
    fn(x)
    times, begin = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return len(x) / min(times)


def choose_engine(checkpoint: str | Path, device: str = "auto", amp: str = "auto", batch: int = 32) -> dict:
    """Which runtime is faster for inference on this machine, measured, not assumed.

    Exports the checkpoint next to itself (once), checks that ONNX Runtime gives PyTorch's logits (max difference
    below 1e-3), times a batch of ``batch`` images in PyTorch (channels-last, at ``amp``) and in ONNX Runtime fp32,
    and answers the faster. The answer is kept beside the checkpoint for this CPU, so later calls cost nothing.
    Measured on lite0 (2 cores): ONNX Runtime fp32 was ~4x eager on an AVX-512 Intel, 3.6x on an AVX2-only EPYC.
    CUDA devices always run PyTorch.
    """
    ckpt = Checkpoint.load(checkpoint)
    dev = resolve_device(device)
    if dev.type != "cpu":
        return {"engine": "torch", "why": f"{dev.type} device"}
    ckpt_path = ckpt.path.resolve()  # the memo names files that must be found from any folder
    record = ckpt_path.with_name(ckpt_path.name + ".engine.json")
    key = {"cpu_model": cpu_model(), "cores": physical_cores(), "checkpoint_mtime_ns": ckpt_path.stat().st_mtime_ns,
           "amp": resolve_amp(amp, dev), "batch": batch}  # fmt: skip
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            if saved.get("key") == key and Path(saved.get("onnx_path", "")).is_file():
                return saved
        except (OSError, json.JSONDecodeError):
            pass  # measured again below
    model = ckpt.build_model().to(memory_format=torch.channels_last)
    if model.export_blocker:
        return {"engine": "torch", "why": f"this model has no ONNX form ({model.export_blocker.split('.')[0]})"}
    onnx_path = ckpt_path.with_suffix(".onnx")
    if not onnx_path.is_file() or onnx_path.stat().st_mtime_ns < ckpt_path.stat().st_mtime_ns:
        export_onnx(ckpt_path, onnx_path)
    runner = OnnxRunner(onnx_path)
    size = ckpt.preprocess.input_size
    x = torch.randn(batch, 3, size, size)

    @torch.inference_mode()
    def eager(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=key["amp"] == "bf16"):
            return model(t.contiguous(memory_format=torch.channels_last)).float()

    with torch.inference_mode():
        fp32_diff = float((model(x[:2]) - runner(x[:2])).abs().max())
    torch_speed, onnx_speed = images_per_second(eager, x), images_per_second(runner, x)
    engine = "onnx" if onnx_speed > torch_speed and fp32_diff < 1e-3 else "torch"
    result = {
        "engine": engine, "torch_img_s": torch_speed, "onnx_img_s": onnx_speed, "max_abs_diff": fp32_diff,
        "onnx_path": str(onnx_path), "key": key,
        "why": f"ONNX Runtime {onnx_speed:.0f} img/s vs PyTorch {torch_speed:.0f} img/s ({key['amp']}) at batch "
               f"{batch} on {key['cpu_model']}" + ("" if fp32_diff < 1e-3 else "; ONNX logits differ: PyTorch kept"),
    }  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only checkpoint folder only loses the memo
        write_text(record, json.dumps(result, indent=2))
    return result


def model_for_engine(model: str | Path, engine: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(the file to run, why): an .onnx file runs in ONNX Runtime; a checkpoint in PyTorch, or in ONNX Runtime
    (exported next to it) with ``engine="onnx"``, or with ``"auto"`` where ONNX Runtime measured faster here."""
    model = str(model)
    if Path(model).suffix == ".onnx":
        if engine == "torch":
            raise ConfigError("--engine torch needs a checkpoint; an .onnx file runs with --engine onnx")
        return model, "an ONNX file"
    if engine == "torch":
        return model, "asked for"
    if engine == "onnx":
        return export_onnx(model)["path"], "asked for"  # next to the checkpoint, reused by later calls
    if not has("export"):
        return model, "torch (ONNX Runtime is in the 'export' extra, not installed)"
    choice = choose_engine(model, device)
    return (choice["onnx_path"] if choice["engine"] == "onnx" else model), f"{choice['engine']} ({choice['why']})"


def with_added_classes(checkpoint: str | Path, class_info: str | Path) -> tuple[Path, list[str]]:
    """A checkpoint that also scores the new classes of ``class_info`` (see ``Predictor.add_classes``), written
    beside ``checkpoint`` as ``STEM_added_classes.pt``: it exports, serves and predicts like any other."""
    ckpt = Checkpoint.load(checkpoint)
    predictor = Predictor.from_checkpoint(ckpt.path, device="cpu")
    added = predictor.add_classes(class_info)
    out = ckpt.path.with_name(f"{ckpt.path.stem}_added_classes.pt")
    Checkpoint.from_model(predictor.model, predictor.classes, config=ckpt.config).save(out)
    return out, added


class Predictor:
    """Top-k classes with probabilities for PIL images or files, from a PyTorch model or an ONNX file.

    Either way the images go through :func:`eval_transform`, the preprocessing evaluation uses.
    """

    def __init__(
        self,
        model: nn.Module | Callable,
        classes: Sequence[str],
        preprocess: Preprocess,
        device="cpu",
        info: dict | None = None,
    ) -> None:
        self.device = torch.device(device)
        #: method, model options and where the model came from (for /v1/model and reports)
        self.info = dict(info or {})
        if isinstance(model, nn.Module):
            model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model = model
        self.classes = list(classes)
        self.preprocess = preprocess
        self.transform = eval_transform(preprocess)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Predictor:
        ckpt = Checkpoint.load(path)
        info = {"method": ckpt.method, "model_kwargs": ckpt.model_kwargs, "engine": "torch", "path": str(ckpt.path)}
        return cls(ckpt.build_model(), ckpt.classes, ckpt.preprocess, resolve_device(device), info)

    @classmethod
    def from_onnx(
        cls, path: str | Path, threads: int | None = None, spinning: bool = True, graph_opt: str = "all"
    ) -> Predictor:
        runner = OnnxRunner(path, threads, spinning, graph_opt)
        meta = runner.meta
        info = {"method": meta["method"], "model_kwargs": meta["model_kwargs"], "engine": "onnxruntime"}
        info["path"] = str(path)
        return cls(
            runner,
            meta["classes"],
            Preprocess.from_dict(meta["preprocess"]),
            info=info,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool = True,
        graph_opt: str = "all",
    ) -> Predictor:
        """A checkpoint (.pt or run directory) runs in PyTorch; an .onnx file in ONNX Runtime."""
        if Path(path).suffix == ".onnx":
            return cls.from_onnx(path, threads, spinning, graph_opt)
        return cls.from_checkpoint(path, device)

    def upscale_small_inputs(self, sr_model: str | Path, min_side: int) -> Predictor:
        """Images whose shorter side is below ``min_side`` are enlarged by a ``finegrain sr train`` model before
        the usual preprocessing (instead of by the plain resize), restoring some of the detail they lack."""
        self.transform = v2.Compose([SRUpscaleSmall(load_sr(sr_model), min_side), eval_transform(self.preprocess)])
        self.info["super_resolution"] = {"model": str(sr_model), "below": min_side}
        return self

    def add_classes(self, class_info: str | Path) -> list[str]:
        """Also score the classes of a ``class_info`` folder that the model was not trained on: from their
        attributes / description (zero-shot) and their reference image (imprinted). Returns the classes added."""
        if not isinstance(self.model, nn.Module):
            raise ConfigError("classes are added to a PyTorch checkpoint (.pt or run folder), not to an ONNX file: "
                              "pass the checkpoint the ONNX file was exported from")  # fmt: skip
        info = load_class_info(class_info)
        new = info.new_classes(self.classes)
        if not new:
            raise DataError(f"'{class_info}' describes no class the model does not already have: nothing to add")
        if self.model.embedding is None:
            raise no_class_prior(self.model.method)
        with_image = frozenset(c for c in new if c in info.images)
        embed = embed_classes(self.model.embedding, new, info, optional=with_image)
        prototypes = None
        if with_image:
            rows = [i for i, c in enumerate(new) if c in with_image]
            batch = torch.stack([self.transform(open_image(info.images[new[i]])) for i in rows])
            with torch.inference_mode():
                feats = self.model.backbone_features(batch.to(self.device, memory_format=torch.channels_last))
            prototypes = torch.zeros(len(new), feats.shape[1])
            prototypes[rows] = feats.float().cpu()
        self.model.add_classes(embed, prototypes)
        self.classes += new
        self.info["added_classes"] = {"class_info": str(class_info), "classes": new}
        return new

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (on the CPU) for a batch already through :attr:`transform`."""
        if isinstance(self.model, nn.Module):
            x = x.to(self.device, memory_format=torch.channels_last)
        return self.model(x).float().cpu()

    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.logits(torch.stack([self.transform(img.convert("RGB")) for img in images])).softmax(-1)

    def probabilities_for(self, paths: Sequence[str | Path]) -> torch.Tensor:
        return self.probabilities([open_image(p) for p in paths])

    def topk(self, probs: torch.Tensor, k: int = 5) -> list[list[dict]]:
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [{"class": self.classes[i], "index": int(i), "prob": float(v)} for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def predict(self, x, k: int = 5) -> list[dict] | list[list[dict]]:
        """Top-``k`` ``[{"class", "index", "prob"}]`` for one image (a path, a PIL image or an ``H x W x 3`` uint8
        array), or a list of those for a list of images."""
        one = not isinstance(x, list | tuple)
        tops = self.topk(self.probabilities([as_image(i) for i in ([x] if one else x)]), k)
        return tops[0] if one else tops

    def predict_files(
        self, paths: Sequence[str | Path], k: int = 5, batch_size: int = 32, skip_bad: bool = False
    ) -> list[dict]:
        """``[{"path", "top": [{"class", "index", "prob"}, ...]}]`` in the order of ``paths``.

        ``skip_bad``: an image that does not decode gets ``{"path", "error"}`` instead of stopping the rest."""
        out = []
        for i in range(0, len(paths), batch_size):
            chunk, images, errors = list(paths[i : i + batch_size]), [], {}
            for p in chunk:
                try:
                    images.append(open_image(p))
                except BadImageError as e:
                    if not skip_bad:
                        raise
                    errors[str(p)] = str(e.__cause__ or e)
            tops = iter(self.topk(self.probabilities(images), k)) if images else iter(())
            out += [{"path": str(p), "error": errors[str(p)]} if str(p) in errors else
                    {"path": str(p), "top": next(tops)} for p in chunk]  # fmt: skip
        return out
