"""Dynamic batching: frames from concurrent requests share one network call, as Triton and TorchServe do.

A request's frames wait at most ``max_wait_s`` for others to fill a batch; while the network runs,
new requests gather for the next one. The queue is bounded in frames: past ``max_queue`` a request is
refused at once (``Overloaded``: 503 with Retry-After) instead of waiting without limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mammacls.inference.predictor import Frame, Prediction

Classify = Callable[[list[Frame]], list[Prediction]]


class Overloaded(Exception):
    """The queue is full: try again shortly."""


@dataclass
class _Job:
    frames: list[Frame]
    done: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher did, for /healthz and the load benchmark."""
    batches: int = 0
    frames: int = 0
    largest: int = 0
    refused: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class DynamicBatcher:
    """Collect frames from many requests into batches of at most ``max_batch`` for ``classify``, which
    runs on one thread of its own (ONNX Runtime releases the GIL and uses every core itself)."""

    def __init__(self, classify: Classify, *, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 512) -> None:
        self.classify, self.max_batch, self.max_wait_s, self.max_queue = classify, max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._queued = 0  # frames waiting or running
        self._runner: asyncio.Task | None = None
        self._network = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mammacls-network")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """After the server stopped taking requests: finish what is queued, then stop."""
        if self._runner is not None:
            while self._queued:
                await asyncio.sleep(0.01)
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        self._network.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return self._queued

    async def submit(self, frames: list[Frame]) -> list[Prediction]:
        """One record per frame, in order; ``Overloaded`` when the queue cannot take them now."""
        if not frames:
            return []
        if self._queued + len(frames) > self.max_queue:
            self.stats.refused += 1
            raise Overloaded(f"{self._queued} frames queued, room for {self.max_queue}")
        self._queued += len(frames)
        job = _Job(frames, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            count = len(jobs[0].frames)
            deadline = loop.time() + self.max_wait_s
            while count < self.max_batch:
                if self._queue.empty():
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
                    continue
                jobs.append(self._queue.get_nowait())
                count += len(jobs[-1].frames)
            await self._classify_jobs(loop, jobs, count)

    async def _classify_jobs(self, loop, jobs: list[_Job], count: int) -> None:
        frames = [f for job in jobs for f in job.frames]
        try:
            records: list[Prediction] = []
            for start in range(0, len(frames), self.max_batch):  # a cine loop may hold more than a batch
                chunk = frames[start:start + self.max_batch]
                records.extend(await loop.run_in_executor(self._network, self.classify, chunk))
                self.stats.batches += 1
                self.stats.largest = max(self.stats.largest, len(chunk))
                self.stats.sizes[len(chunk)] = self.stats.sizes.get(len(chunk), 0) + 1
            self.stats.frames += len(frames)
        except Exception as exc:  # the network failed: every request in the batch hears of it
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(exc)
        else:
            start = 0
            for job in jobs:
                if not job.done.done():  # a client that went away cancelled its future
                    job.done.set_result(records[start:start + len(job.frames)])
                start += len(job.frames)
        finally:
            self._queued -= count
