"""Training labels that may be wrong (``--label-noise prune``): confident learning, then training on the rest.

Before the task is built, every training image is scored by a probe that did not see it (the run's starting
backbone's features, ``FOLDS`` stratified folds, ``finegrain.engine.audit``); the images that cleanlab's confident
learning flags as probably mislabelled are left out of training, listed in ``RUN_DIR/label_issues.csv`` with the
label the rest of the data suggests. The data itself is not changed, validation and test are not touched, and every
class keeps at least its most credible image. Measured under flipped labels in docs/labels.md.
"""

from __future__ import annotations

import json

from finegrain.atomic import write_text
from finegrain.engine.addons.base import AddOn
from finegrain.engine.audit import find_issues, require_folds, write_audit_csv
from finegrain.engine.context import Context
from finegrain.engine.task import frozen_features
from finegrain.run_layout import RunDir

FOLDS = 5


class LabelNoiseAddOn(AddOn):
    name = "label_noise"
    ISSUES, REPORT = RunDir.LABEL_ISSUES, RunDir.LABEL_NOISE
    files = (ISSUES, REPORT)
    data_only = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.labels.label_noise != "none"

    def prepare(self, ctx: Context) -> None:
        index = ctx.index
        train = index.split("train")
        require_folds(train, index.classes, FOLDS, "Add training images, or train without --label-noise")
        feats = frozen_features(ctx, train, "train", "--label-noise")
        issues, summary = find_issues(train, feats, index.classes, FOLDS, self.cfg.run.seed)
        dropped = {e.sample.key for e in issues}
        for k in range(len(index.classes)):  # never a whole class: keep its most credible image
            mine = [e for e in issues if e.sample.label == k and e.sample.key in dropped]
            if mine and len(mine) == sum(s.label == k for s in train):
                dropped.discard(max(mine, key=lambda e: e.p_given).sample.key)
        index.samples = [s for s in index.samples if s.split != "train" or s.key not in dropped]
        if ctx.info.is_main:
            kept_issues = [e for e in issues if e.sample.key in dropped]
            write_audit_csv(kept_issues, index, ctx.run_dir / self.ISSUES)
            summary["left_out"] = len(dropped)
            write_text(ctx.run_dir / self.REPORT, json.dumps(summary, indent=2))
            ctx.log(f"--label-noise prune: {len(dropped)} of {len(train)} training images left out as probably "
                    f"mislabelled (out-of-fold top-1 {summary['out_of_fold_top1']:.3f}); RUN_DIR/{self.ISSUES} "
                    "lists them")  # fmt: skip
