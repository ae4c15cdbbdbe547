"""Re-planning a time-limited run's epochs from the speed it actually has (``--replan-epochs``, set by ``--budget``).

A plan made once, from a speed probe at the start, is wrong whenever the machine's load changes during the run. The
accuracy issue measured both ways on a 2-core AMD EPYC Zen 5: a probe taken while another job ran planned 4 epochs
at 10.5 img/s, the run then went at ~25 img/s and stopped with half of its 20 minutes unused; the other way round,
``--time-limit`` cut a cosine schedule part-way (a cub100 student ran 1 of 37 planned epochs, docs/training.md).
Re-planning after every epoch from the last epoch's wall time lets the schedule grow or shrink so it ends, annealed,
at the limit. That time is the epoch's steps and validation: an add-on's one-off work before them (the mirror check,
~17 s once) counts in the elapsed time only. Counted as an epoch's, it cut a 30-minute flowers17 plan from 57 epochs to
43 for one epoch, which moved its cosine lr back and forth (AMD EPYC Zen 4, 2026-12-07).
"""

from __future__ import annotations

from collections.abc import Callable

#: the share of the limit a re-plan may leave unused, and how far past it an extra epoch may end where it would not
OVERSHOOT = 0.1
#: the most epochs a plan holds: on a tiny dataset a long budget would otherwise buy thousands of epochs of
#: fine-tuning a pretrained network, which no schedule here needs (the budget is then not all used)
MAX_EPOCHS = 300


def replan_epochs(limit_s: float, elapsed_s: float, epoch_s: float, done: int,
                  cost: Callable[[int, int], float] = lambda epoch, planned: 1.0) -> int:  # fmt: skip
    """The total number of epochs for ``limit_s`` seconds, ``done`` epochs having taken ``elapsed_s`` and an epoch
    of cost 1 taking ``epoch_s`` (the last one's seconds over its cost): the whole epochs that fit, so the run ends
    inside its limit; one more only where stopping would leave more than ``OVERSHOOT`` of the limit unused and the
    extra epoch ends at most that late and closer to the limit. Never fewer than ``done``, nor more than
    ``MAX_EPOCHS``. ``cost(epoch, planned)``: epoch ``epoch``'s (0-based) time relative to ``epoch_s`` under a plan
    of ``planned`` epochs (1 unless an add-on changes it: ``AddOn.epoch_cost``).

    Why inside first: the default is a 10-minute budget, and the accuracy issue asks for at most 10 minutes. Ending
    at the nearest epoch end (the rule until 2026-12-03) ran the default 10.2-10.4 minutes on AMD EPYC Zen 5."""
    if epoch_s <= 0:
        return done
    left = limit_s - elapsed_s

    def needs(planned: int) -> float:  # seconds the epochs after ``done`` take under a plan of ``planned``
        return epoch_s * sum(cost(e, planned) for e in range(done, planned))

    n = done
    while n < MAX_EPOCHS and needs(n + 1) <= left:
        n += 1
    if n < MAX_EPOCHS:
        short, late = left - needs(n), needs(n + 1) - left  # unused seconds if we stop; past the limit with one more
        if short > OVERSHOOT * limit_s and late <= OVERSHOOT * limit_s and late < short:
            n += 1
    return n
