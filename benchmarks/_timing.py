"""Batch-1 latency of a predictor, as the method benchmarks report it: median of repeated runs after a warm-up."""

from __future__ import annotations

import statistics
import time

import torch

from finegrain.predict import Predictor


def latency_ms(predictor: Predictor, runs: int = 30) -> float:
    x = torch.randn(1, 3, predictor.preprocess.input_size, predictor.preprocess.input_size)
    predictor.logits(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.logits(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
