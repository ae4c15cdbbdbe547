"""Quantization-aware training: fake int8 rounding as ONNX Runtime will run the model
(``finegrain.models.fake_quant``), activation ranges calibrated on the images the int8 export calibrates on."""

from __future__ import annotations

from finegrain.config import TrainConfig
from finegrain.data.calibration import calibration_loader, evenly_spaced
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.env import resolve_int8_target
from finegrain.models.fake_quant import calibrate, prepare_qat


class QATAddOn(AddOn):
    name = "qat"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return cfg.quantization.qat

    def prepare(self, ctx: Context) -> None:
        q = self.cfg.quantization
        target = resolve_int8_target(q.int8_target)
        prepare_qat(ctx.model, target)
        samples = evenly_spaced(ctx.index.split("train"), q.calib_images)
        seen = calibrate(ctx.model, (x for x, _ in calibration_loader(samples, ctx.model.preprocess)), ctx.device)
        ctx.amp = "none"  # the rounding is simulated in fp32
        ctx.log(f"qat: int8 rounding ({target}) simulated, activation ranges calibrated on {seen} training images")
