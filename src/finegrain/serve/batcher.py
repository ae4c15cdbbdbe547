"""Micro-batching: concurrent requests wait a few milliseconds so that they share one forward pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class MicroBatcher:
    """Collects single images into batches of at most ``max_batch``, waiting at most ``max_wait_ms`` after
    the first one, and runs ``fn`` on them in one worker thread (``max_batch=1``: no batching).

    Everything that touches the model goes through :meth:`run` on the same thread, so a model is never used
    by two threads at once (Grad-CAM's hooks would otherwise see other requests' passes).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 16, max_wait_ms: float = 5.0):
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.executor: ThreadPoolExecutor | None = None  # made by start(), so a stopped batcher can start again
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.images = 0

    async def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finegrain-model")
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One preprocessed image (C, H, W) -> its output row and the size of the batch it ran in."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def run(self, fn: Callable, *args):
        """Run any model work (e.g. an explanation) on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(x, f) for x, f in batch if not f.cancelled()]  # clients that gave up
            if not batch:
                continue
            try:
                out = await self.run(self.fn, torch.stack([x for x, _ in batch]))
            except Exception as e:  # noqa: BLE001 - every waiting request must hear about the failure
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            for i, (_, f) in enumerate(batch):
                if not f.done():
                    f.set_result((out[i], len(batch)))
