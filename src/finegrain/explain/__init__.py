"""Explanations of predictions: heat-maps of where the model looked, drawn over the photo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from finegrain.explain.cam import grad_cam, occlusion
from finegrain.explain.render import overlay, with_top_classes
from finegrain.predict import Predictor


@dataclass
class Explanation:
    cam: np.ndarray  # (H, W) in [0, 1] over the model's input
    top: list[dict]
    method: str  # "grad-cam" (PyTorch) or "occlusion" (ONNX Runtime)
    #: the method's own evidence: regions it zoomed into, per scale (x0, y0, x1, y1 in [0, 1] of its input)
    boxes: list[list[float]] = field(default_factory=list)
    #: attributes of the predicted class's description that added most to its score (class-prior methods)
    evidence: list[dict] = field(default_factory=list)

    def overlay(self, image: Image.Image, predictor: Predictor) -> Image.Image:
        return overlay(image, self.cam, predictor.preprocess, boxes=self.boxes)

    def picture(self, image: Image.Image, predictor: Predictor) -> Image.Image:
        """Overlay plus the top classes as bars: what ``finegrain explain`` writes."""
        return with_top_classes(self.overlay(image, predictor), self.top)


def explain(predictor: Predictor, images: Sequence[Image.Image], k: int = 5) -> list[Explanation]:
    """Heat-maps for the predicted class of each image, with the top-``k`` classes."""
    x = torch.stack([predictor.transform(img.convert("RGB")) for img in images])
    boxes = [[] for _ in images]
    if isinstance(predictor.model, nn.Module):
        x = x.to(predictor.device, memory_format=torch.channels_last)
        cams, logits = grad_cam(predictor.model, x)
        method = "grad-cam"
        per_region = predictor.model.attention_boxes(x)
        boxes = [[b[i].tolist() for b in per_region] for i in range(len(images))]
        evidence = predictor.model.class_evidence(x, logits.argmax(1).tolist())
    else:
        cams, logits = occlusion(predictor.model, x)
        method = "occlusion"
        evidence = [[] for _ in images]
    tops = predictor.topk(logits.float().softmax(-1).cpu(), k)
    return [Explanation(c.cpu().numpy(), t, method, b, e)
            for c, t, b, e in zip(cams, tops, boxes, evidence, strict=True)]  # fmt: skip
