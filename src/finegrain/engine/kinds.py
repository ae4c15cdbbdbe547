"""Which kind of task a run trains, from its options: a new kind is one file (its ``Task`` and its builder) plus one
line in ``TASK_KINDS``.

- cached maps (``engine/map_task.py``): ``--no-freeze-backbone --train-stages N``, the last N stages on cached maps;
- cached features (``engine/task.py``): a frozen backbone whose features depend on the image only, the head alone;
- images (``engine/task.py``): everything else, the whole model (or a frozen backbone's head on fresh views).
"""

from __future__ import annotations

from collections.abc import Callable

from finegrain.config import TrainConfig
from finegrain.data.source import data_source
from finegrain.engine.context import Context
from finegrain.engine.map_task import map_task
from finegrain.engine.task import Task, feature_task, image_task


def _features(ctx: Context) -> Task:
    data_source(ctx.index).require_listed(
        "a head on cached features (streamed images are read one by one, not cached as features)",
        "add --no-cache-features (frozen backbone) or --no-freeze-backbone, or train from a local shard folder",
    )
    return feature_task(ctx)


#: (what the run trains on, when a run's options and model ask for it, how its task is built); the first that
#: applies is built
TASK_KINDS: list[tuple[str, Callable[[TrainConfig, object], bool], Callable[[Context], Task]]] = [
    ("cached maps", lambda cfg, model: cfg.model.train_stages > 0, map_task),
    ("the head on cached features",
     lambda cfg, model: cfg.model.freeze_backbone and cfg.features.cache_features and model.cacheable, _features),
    ("images", lambda cfg, model: True, image_task),
]  # fmt: skip


def build_task(ctx: Context) -> Task:
    """The first task kind the run's options ask for, with the add-ons attached."""
    what, build = next((what, build) for what, wants, build in TASK_KINDS if wants(ctx.cfg, ctx.model))
    task = build(ctx)
    for addon in ctx.addons:
        addon.attach(ctx, task)
    ctx.log(f"training on {what}; run dir {ctx.run_dir}")
    return task
