"""Micro-batching: concurrent requests for one model are scored together, off the event loop.

Each model has a bounded queue and one worker task. The worker takes the first waiting image, then,
while more requests for the model are on their way (admitted, body being read or decoded), waits at
most ``max_wait_s`` for them, up to ``max_batch``, and scores the batch in the scoring
thread (one thread for all models, so two models never fight over the cores). While a batch is
being scored new requests queue up, so under load batches fill without waiting. A full queue is
refused at once (:class:`QueueFull`, a ``503``): the backlog never grows past ``max_queue``.

Scoring is ``predict``'s (:meth:`~spotdiff.detect.scoring.ImageScorer.score_batch`). When a batch
raises, its images are scored one by one, so only the image(s) the model fails on get a ``500``.
A batch's audit lines are written and fsync'ed in the scoring thread before any of its futures is
resolved, so no response leaves before its line is on disk.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from spotdiff.detect.scoring import ERROR, DecodedImage, ScoredImage
from spotdiff.serve.audit import AuditLog, utc_now
from spotdiff.serve.metrics import Metrics
from spotdiff.serve.scoring import ServedModel, mask_png, overlay_png, score_alone


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` images already."""


@dataclass
class Job:
    """One image waiting to be scored: ``item`` as :meth:`ImageScorer.decode_image` made it."""

    item: DecodedImage
    sha256: str
    overlay: bool = False
    mask: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: asyncio.Future[Outcome] | None = None


@dataclass
class Outcome:
    """What the scoring thread hands back: the score/decision, the audit record as written, PNGs asked for."""

    scored: ScoredImage
    record: dict[str, Any]
    overlay: bytes | None = None
    mask: bytes | None = None


class MicroBatcher:
    """Queue and worker of one model (see module docstring)."""

    def __init__(
        self,
        model: ServedModel,
        executor: Executor,
        audit: AuditLog,
        metrics: Metrics,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_outcome: Callable[[ServedModel, Job, Outcome], None] | None = None,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.audit = audit
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_outcome = on_outcome
        self.arriving = arriving
        """Requests for this model not queued yet (body or decoding under way); None: always wait ``max_wait_s``."""
        self._waiting: collections.deque[Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Images queued or being scored."""
        return len(self._waiting) + self._in_flight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher {self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._waiting:
            if job.future is not None and not job.future.done():
                job.future.cancel()
        self._waiting.clear()

    def submit(self, job: Job) -> asyncio.Future[Outcome]:
        """Queue ``job``; its future resolves to an :class:`Outcome` (or the scoring thread's exception)."""
        if self.depth >= self.max_queue:
            raise QueueFull(f"model {self.model.name!r} has {self.depth} image(s) waiting (limit {self.max_queue})")
        job.future = asyncio.get_running_loop().create_future()
        self._waiting.append(job)
        self._arrived.set()
        return job.future

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while len(self._waiting) < self.max_batch:
            if self.arriving is not None and self.arriving() == 0:
                break  # nothing else is on its way: waiting would only add latency
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
        return [job for job in batch if job.future is not None and not job.future.done()]  # drop given-up requests

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self._in_flight = len(batch)
            try:
                outcomes = await loop.run_in_executor(self.executor, self._score, batch)
            except Exception as exc:  # noqa: BLE001 - e.g. the audit log cannot be written: every job fails
                for job in batch:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self._in_flight = 0
            for job, outcome in zip(batch, outcomes, strict=True):
                if self.on_outcome is not None:
                    self.on_outcome(self.model, job, outcome)
                if job.future is not None and not job.future.done():
                    job.future.set_result(outcome)

    def _score(self, batch: list[Job]) -> list[Outcome]:
        """Scoring thread: score (``ImageScorer.score_batch``), render what was asked for, append the
        audit lines (fsync), in that order."""
        model = self.model
        items = [job.item for job in batch]
        try:
            scored = model.scorer.score_batch(items)
        except Exception:  # noqa: BLE001 - a failing model fails the image(s) it fails on, never the service
            scored = [score_alone(model, item) for item in items]
        outcomes = []
        for job, result in zip(batch, scored, strict=True):
            ok = result.decision != ERROR
            record = {
                "time": utc_now(),
                "request_id": job.request_id,
                "model": model.name,
                "image_sha256": job.sha256,
                "model_fingerprint": model.fingerprint,
                "score": result.score if ok else None,
                "normalized_score": result.normalized_score if ok else None,
                "decision": result.decision,
                "threshold": model.scorer.threshold,
            }
            if not ok:
                record["error"] = result.error
            outcome = Outcome(result, record)
            if ok and job.overlay:
                outcome.overlay = overlay_png(model, result)
            if ok and job.mask:
                outcome.mask = mask_png(model, result)
            outcomes.append(outcome)
        self.audit.append([o.record for o in outcomes])
        self.metrics.batch(model.name, len(batch))
        for o in outcomes:
            self.metrics.decision(model.name, o.record["decision"])
        return outcomes
