"""Consistency training on unlabelled images (``--consistency WEIGHT``): FixMatch on cached maps.

Where the last stages train on cached maps of the frozen first stages (``--train-stages N``, engine/map_task.py),
the ``--unlabeled`` images get maps too: their plain view once and ``--map-views`` augmented views. Each step adds
to the labelled loss ``WEIGHT`` times the unlabelled loss of as many unlabelled images as the batch has labelled
ones: the current network predicts each one's plain view (no gradient), the prediction is aligned to the labelled
class distribution (ReMixMatch's distribution alignment: scaled by the labelled class shares over the running mean
of the predictions, so that a few easy classes do not take every pseudo-label), and where the aligned confidence
reaches ``--consistency-threshold`` its class is the target of one of the image's augmented views (Sohn et al.,
FixMatch, 2020).

Why on maps: FixMatch's predictions move as the network learns, so the unlabelled images are run through the
trained part at every step; on a 2-core CPU only the upper stages on cached maps are cheap enough for that (the last
two stages of lite0 ran 4.7x faster than the whole network per image, docs/training.md). The augmented views are
the run's own training augmentation, fixed once per run (the map cache), not RandAugment on every step.

Randomness comes from the torch stream the checkpoints save (which images, which view), and the running mean is in
the add-on's state, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.data.unlabeled import load_unlabeled
from finegrain.engine.addons.base import AddOn, Criterion
from finegrain.engine.context import Context
from finegrain.engine.evaluate import autocast
from finegrain.engine.map_task import MAX_CACHE_BYTES, MapTask
from finegrain.errors import ConfigError

#: how fast the running mean of the predictions follows the batches (ReMixMatch keeps the last 128 batches' mean)
MOMENTUM = 0.99


class ConsistencyAddOn(AddOn):
    name = "consistency"
    on_maps = True

    @classmethod
    def wanted(cls, cfg) -> bool:  # where the recipe trains the whole network or the head, it does not apply
        return cfg.labels.consistency > 0 and cfg.model.train_stages > 0 and not cfg.model.freeze_backbone

    def prepare(self, ctx: Context) -> None:
        # before --unlabeled's pseudo-labels join the training split (they would then count as labelled repeats)
        self.images = load_unlabeled(self.cfg.labels.unlabeled, ctx.index, self.cfg.dataset.skip_bad, progress=False)
        if not self.images.samples:
            raise ConfigError(f"--consistency: no usable unlabelled image in '{self.cfg.labels.unlabeled}' "
                              f"({self.images.summary()}): add images, or drop --consistency")  # fmt: skip

    def attach(self, ctx: Context, task) -> None:
        if not isinstance(task, MapTask):
            raise ConfigError("--consistency trains on cached maps: add --no-freeze-backbone --train-stages 2")
        samples = self.images.samples
        one = task.train_set.maps[0, 0]
        views = min(self.cfg.features.map_views, MAX_CACHE_BYTES // (len(samples) * one.nbytes) - 1)
        if views < 1:
            raise ConfigError(f"the maps of {len(samples)} unlabelled images take "
                              f"{len(samples) * one.nbytes / 2**30:.1f} GiB a view, over the cache: use fewer "
                              "unlabelled images, or train fewer stages (smaller maps)")  # fmt: skip
        self.plain = task.maps(ctx, samples, 1, "maps (unlabelled, plain)", augmented=False)[0]
        self.views = task.maps(ctx, samples, int(views), f"maps (unlabelled, {int(views)} views)")
        labels = task.train_set.labels
        self.prior = torch.bincount(labels, minlength=len(ctx.index.classes)).float() / len(labels)
        self.running = self.prior.clone()
        self.ctx, self.task = ctx, task
        ctx.log(f"--consistency {self.cfg.labels.consistency:g}: {len(samples)} unlabelled images, their plain "
                f"view and {int(views)} augmented view(s) cached")  # fmt: skip

    def unlabeled_loss(self, n: int, device: torch.device) -> torch.Tensor:
        """FixMatch's loss on ``n`` unlabelled images drawn at random."""
        module, amp = self.task.trainable, self.task.precision(self.ctx.amp)
        rows = torch.randint(len(self.plain), (n,))
        chosen = torch.randint(len(self.views), (n,))
        with torch.no_grad(), autocast(device, amp):
            probs = module(self.plain[rows].float().to(device)).float().softmax(1).cpu()
        self.running = MOMENTUM * self.running + (1 - MOMENTUM) * probs.mean(0)
        aligned = probs * (self.prior / self.running.clamp_min(1e-6))
        confidence, target = (aligned / aligned.sum(1, keepdim=True)).max(1)
        mask = (confidence >= self.cfg.labels.consistency_threshold).float()
        with autocast(device, amp):
            logits = module(self.views[chosen, rows].float().to(device))
        return (F.cross_entropy(logits.float(), target.to(device), reduction="none") * mask.to(device)).mean()

    def criterion(self, base: Criterion, x: torch.Tensor, batch, images: bool) -> Criterion:
        weight = self.cfg.labels.consistency

        def with_unlabeled(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return base(logits, y) + weight * self.unlabeled_loss(len(y), logits.device)

        return with_unlabeled

    def state_dict(self) -> dict:
        return {"running": self.running.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"].clone()
