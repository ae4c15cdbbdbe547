"""Mirroring decided from data (``--mirror-check``, which the budgeted recipe sets): the first epochs train without
it, then the network is asked about mirrored validation images and a sample of mirrored training images; where one
class's mirror images are answered as another class's and back (keep left / keep right), mirroring stays off for
the run, else it is turned on.

Why: flip augmentation teaches that an image and its mirror image are one class. On gtsrb_finegrained the default (20
whole-network epochs at 128 px, mirroring on) made 144 test errors, 76 of them swaps inside the four mirror pairs
(dangerous curve, turn, go straight or, keep: left/right) (AMD EPYC Zen 5, 2 cores, seed 0, 2026-12-03). Frozen
ImageNet features cannot see it beforehand (``engine/mirror.py``), and neither can a network one epoch away from them:
on gtsrb (seed 0) the four pairs' recognised training images went across when mirrored 9% of the time after one epoch
without mirroring, 25% after two, and after three 52-70% for three pairs (dangerous curve: 18%); a flip-free network
trained to the end: all four pairs, 67-100% of validation images. So the check comes after ``CHECK_AFTER`` epochs
(fewer in short runs: a third of them), and after a tenth (at most ``CHECK_AFTER_MAX``) of a run of 40 epochs or
more: three epochs are too few where the network learns slowly. A 30-minute gtsrb run cropping from 0.08 of the image
(100 epochs planned, 87 run) found no pair after 3 epochs (the strongest candidate: 60 vs 80 km/h, 5%), so mirroring
came on and it tested 87.5% against 97.6% for the plain recipe; the same stage asked after 8 epochs found three
pairs, 76-87% of their images going across, the next candidate 15% (AMD EPYC Zen 5, seed 0, 2026-12-05). flowers17
and tomato runs asked after 5 and 10 epochs had no candidate at all. Where nothing is found, the cost is those epochs
without mirroring.
``RUN_DIR/mirror.json`` holds the pairs found, the strongest candidates (found or not), and the mirroring used.
"""

from __future__ import annotations

import json

import torch
from torchvision.transforms import v2 as T

from finegrain.atomic import write_text
from finegrain.data import ImageDataset
from finegrain.data.transforms import Mirrored, eval_transform
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.engine.evaluate import evaluate
from finegrain.engine.mirror import candidate_pairs, is_pair
from finegrain.run_layout import RunDir

#: epochs trained without mirroring before the network is asked (at most a third of the run's epochs)
CHECK_AFTER = 3
#: the most epochs a long run waits: its first plan comes from a speed probe and can be far too long (164 epochs
#: planned, 100 run: tomato, 30 minutes, 2026-12-05); gtsrb's pairs were clear after 8
CHECK_AFTER_MAX = 10
#: training images per class asked besides the validation split (they were seen un-mirrored only): more evidence
#: than a 10% validation split's few images per class, for a few seconds of inference
TRAIN_IMAGES_PER_CLASS = 30
#: the strongest candidate pairs kept in mirror.json, found or not: what a miss looked like
CANDIDATES_KEPT = 8


class MirrorCheckAddOn(AddOn):
    name = "mirror_check"
    files = (RunDir.MIRROR,)

    @classmethod
    def wanted(cls, cfg) -> bool:  # whole-network training on images: the cached views of maps and features are fixed
        return cfg.augment.mirror_check and cfg.augment.hflip > 0 and not cfg.model.freeze_backbone \
            and not cfg.model.train_stages  # fmt: skip

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.flips: list[T.RandomHorizontalFlip] = []
        self.report: dict | None = None  # the decision, once made
        self.epoch = 0  # the epoch being trained
        self.ctx: Context | None = None
        self.called = False  # epoch_start seen in this process
        epochs = cfg.optim.epochs  # epochs without mirroring before the check: CHECK_AFTER, a tenth of a long run
        self.after = max(1, min(max(CHECK_AFTER, epochs // 10), CHECK_AFTER_MAX, epochs // 3))

    def train_transform(self, transform):
        todo = [transform]
        while todo:  # the flips of the transform, of any Compose inside it and of any wrapped transform
            t = todo.pop()
            if isinstance(t, T.RandomHorizontalFlip):
                self.flips.append(t)
            todo += [*getattr(t, "transforms", []), *filter(None, [getattr(t, "transform", None)])]
        self._apply()
        return transform

    def attach(self, ctx: Context, task) -> None:
        self.ctx = ctx

    def epoch_start(self, ctx: Context, task, epoch: int) -> bool:
        """Decides before the epoch after ``self.after``, not on this process's first call: a resumed run's comes
        before its weights are restored (``load_state_dict`` decides then)."""
        first, self.called, self.epoch = not self.called, True, epoch
        if self.report is None and epoch >= self.after and not first:
            self._decide()
        return False  # the flips change in place; loader workers start afresh each epoch and take them

    def epoch_info(self, epoch: int) -> dict:
        return {"hflip": self._hflip()}

    def state_dict(self) -> dict:
        return {"report": self.report, "next_epoch": self.epoch + 1}

    def load_state_dict(self, state: dict) -> None:
        self.report = state.get("report")
        if self.report is None and state.get("next_epoch", 0) >= self.after:
            self._decide()  # resumed where the uninterrupted run decided: the weights are restored by now
        self._apply()

    def _hflip(self) -> float:
        return self.report["hflip"] if self.report is not None else 0.0

    def _apply(self) -> None:
        for flip in self.flips:
            flip.p = self._hflip()

    def _asked(self) -> list:
        """The validation images and up to ``TRAIN_IMAGES_PER_CLASS`` training images of each class."""
        index, per_class = self.ctx.index, {}
        for s in index.split("train"):
            per_class.setdefault(s.label, []).append(s)
        return index.split("val") + [s for mine in per_class.values() for s in mine[:TRAIN_IMAGES_PER_CLASS]]

    def _decide(self) -> None:
        ctx, hflip = self.ctx, self.cfg.augment.hflip
        classes, asked = ctx.index.classes, self._asked()
        if not asked:  # streamed shards list no images to ask about: mirroring as the options say
            self._report({"after_epochs": self.after, "images_asked": 0, "pairs": [], "hflip": hflip})
            return
        labels = torch.tensor([s.label for s in asked], dtype=torch.long)
        tf = eval_transform(ctx.model.preprocess)
        answers = []
        with torch.random.fork_rng(devices=[]):  # the training's random stream is the same with or without it
            for view in (tf, Mirrored(tf)):
                loader = torch.utils.data.DataLoader(ImageDataset(asked, view), batch_size=self.cfg.optim.batch_size,
                                                     num_workers=self.cfg.speed.workers)  # fmt: skip
                m = evaluate(ctx.model, loader, len(classes), ctx.device, amp=ctx.amp,
                             channels_last=self.cfg.speed.channels_last, keep_predictions=True)  # fmt: skip
                answers.append(torch.tensor(m["predicted"]))
        candidates = [{**c, "names": [classes[k] for k in c["classes"]]}
                      for c in candidate_pairs(answers[0], answers[1], labels, len(classes))]  # fmt: skip
        pairs = [c for c in candidates if is_pair(c)]
        report = {"after_epochs": self.after, "images_asked": len(asked),
                  "recognised": round(float((answers[0] == labels).double().mean()), 4),
                  "pairs": pairs, "candidates": candidates[:CANDIDATES_KEPT],
                  "hflip": 0.0 if pairs else hflip}  # fmt: skip
        self._report(report)

    def _report(self, report: dict) -> None:
        ctx, hflip = self.ctx, self.cfg.augment.hflip
        self.report = report
        self._apply()
        found = "; ".join(" <-> ".join(p["names"]) for p in report["pairs"])
        ctx.log(f"--mirror-check: {len(report['pairs'])} mirror pair(s) among the classes"
                + (f" ({found}): mirroring stays off" if found else f": mirroring on (--hflip {hflip:g})"))  # fmt: skip
        if ctx.info.is_main:
            write_text(ctx.run_dir / RunDir.MIRROR, json.dumps(report, indent=2))
