"""How busy this machine's CPUs are, read before PyTorch starts, and the OpenMP wait policy that follows from it.

Why: PyTorch's OpenMP threads spin at the end of every parallel region, which is right on an idle machine and
ruinous beside another busy process. Measured with benchmarks/contention.py (AMD EPYC Zen 3, 2 cores, a second
PyTorch job beside, 2026-12-02; images/s busy / alone): lite0 feature extraction 0.40 spinning, 0.62 with
``OMP_WAIT_POLICY=PASSIVE``; fine-tuning 0.24 spinning, 0.57 passive. But alone, passive fine-tuned at 7.6 images/s
against 9.8 spinning. So the command line asks for passive waiting only when other processes already keep the CPUs
busy when it starts; ``OMP_WAIT_POLICY`` set by the user always wins. Nothing here imports PyTorch: the policy has
to be in the environment before OpenMP starts.
"""

from __future__ import annotations

import os
import time

#: other processes' share of the CPUs (0-1) above which waiting threads sleep instead of spinning
BUSY_SHARE = 0.25


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 0.1) -> float | None:
    """The share of all CPUs busy over ``seconds`` (this process sleeps meanwhile, so it is other work)."""
    first = _cpu_times()
    time.sleep(seconds)
    second = _cpu_times()
    if first is None or second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1])


def choose_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY`` (unless the user did) from how busy the CPUs are now; returns what is in force and
    why, for ``finegrain env`` and the run's environment.json."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY'].lower()} (OMP_WAIT_POLICY set)"
    share = busy_share()
    if share is not None and share > BUSY_SHARE:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["FINEGRAIN_WAIT_POLICY"] = f"passive (CPUs {share:.0%} busy at start)"
    else:
        busy = "unknown" if share is None else f"{share:.0%}"
        os.environ["FINEGRAIN_WAIT_POLICY"] = f"spinning, OpenMP's default (CPUs {busy} busy at start)"
    return os.environ["FINEGRAIN_WAIT_POLICY"]
