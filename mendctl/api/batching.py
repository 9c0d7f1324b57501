"""Requests that arrive together answered by one model call: an asyncio queue and one worker.

The worker takes the first waiting item, then whatever else is waiting, and waits up to `max_wait`
seconds for more while the batch is not full. Items of one key (a model and its sampling settings)
run together in one call of `run(key, items)`, in a thread, so the event loop keeps accepting
requests (and the queue keeps filling) while the model works. One call at a time: the model is one.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Callable, Hashable


class Batcher:
    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], max_batch: int = 8, max_wait: float = 0.01):
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be at least 1 and max_wait at least 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches: list[int] = []  # the size of every call made, for reporting how well requests batched

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def submit(self, key: Hashable, item: Any) -> Any:
        """The result `run` gives for `item`; an exception `run` raised is raised here."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((key, item, future))
        return await future

    @property
    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        while True:
            groups: dict[Hashable, list] = defaultdict(list)
            for key, item, future in await self._collect():
                if not future.cancelled():  # its client is gone: nothing to answer
                    groups[key].append((item, future))
            for key, pairs in groups.items():
                self.batches.append(len(pairs))
                try:
                    results = await asyncio.to_thread(self.run, key, [item for item, _ in pairs])
                except Exception as e:  # the whole call failed: each of its requests is told
                    for _, future in pairs:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), result in zip(pairs, results):
                    if not future.done():
                        future.set_result(result)
