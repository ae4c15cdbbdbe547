"""Re-planning a time-limited run's epochs from the speed it actually has (``--replan-epochs``, set by ``--budget``).

A plan made once, from a speed probe at the start, is wrong whenever the machine's load changes during the run. The
accuracy issue measured both ways on a 2-core AMD EPYC Zen 5: a probe taken while another job ran planned 4 epochs
at 10.5 img/s, the run then went at ~25 img/s and stopped with half of its 20 minutes unused; the other way round,
``--time-limit`` cut a cosine schedule part-way (a cub100 student ran 1 of 37 planned epochs, docs/training.md).
Re-planning after every epoch from the last epoch's wall time lets the schedule grow or shrink so it ends, annealed,
at the limit.
"""

from __future__ import annotations

import math

#: how far past the limit a re-plan may end its last epoch rather than stop short by more (a share of the limit)
OVERSHOOT = 0.1
#: the most epochs a plan holds: on a tiny dataset a long budget would otherwise buy thousands of epochs of
#: fine-tuning a pretrained network, which no schedule here needs (the budget is then not all used)
MAX_EPOCHS = 300


def replan_epochs(limit_s: float, elapsed_s: float, epoch_s: float, done: int) -> int:
    """The total number of epochs that ends closest to ``limit_s`` seconds, ``done`` epochs having taken
    ``elapsed_s`` and the last of them ``epoch_s``: whole epochs that fit, plus one more where it would end at most
    ``OVERSHOOT`` of the limit late and closer to the limit than stopping would. Never fewer than ``done``, nor more
    than ``MAX_EPOCHS``."""
    if epoch_s <= 0:
        return done
    fits = (limit_s - elapsed_s) / epoch_s
    n = max(0, math.floor(fits))
    short = (fits - n) * epoch_s  # unused seconds if we stop after n more
    late = (n + 1 - fits) * epoch_s  # seconds past the limit with one more
    if fits >= 0 and late <= OVERSHOOT * limit_s and late < short:
        n += 1
    return max(done, min(done + n, MAX_EPOCHS))
