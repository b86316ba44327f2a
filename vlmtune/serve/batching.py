"""The server's one generation thread: requests that arrive together share one `generate` call.

Request handlers encode their prompt (inside `preparing()`) and `submit` a `Job`; this thread takes
every job waiting, and when it was idle it also waits a moment for requests still being prepared,
so that requests sent at the same moment meet (a lone request does not wait). It picks the oldest
job's group and answers up to `max_batch` jobs of that group in one call of
`Generator.complete`. A group is a model variant and a sampling setting: one call runs one adapter
and one way of choosing tokens. A request with a `seed` is a group of its own, so its answer does
not depend on which other requests happened to arrive with it. Answers go back through each job's
callbacks, from this thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from vlmtune.generation import Completion, Generator, Sampling


@dataclass(eq=False)
class Job:
    """One request, encoded and ready to generate.

    Args:
        on_text: receives each new piece of the answer (streaming), or None.
        on_done: receives the `Completion`, or the exception that stopped the call.
    """

    variant: str
    prompt: dict
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    on_done: Callable[[Completion | BaseException], None]
    on_text: Callable[[str], None] | None = None
    submitted: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        return (self.variant, self.sampling) if self.sampling.seed is None else (self.variant, self.sampling, id(self))


class Batcher:
    """Runs `Job`s on `generator`, up to `max_batch` in one call.

    Args:
        wait_s: how long an idle batcher waits, after the first job, for requests still being
            prepared to join it.
    """

    def __init__(self, generator: Generator, max_batch: int = 16, wait_s: float = 0.02):
        self.generator, self.max_batch, self.wait_s = generator, max_batch, wait_s
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._preparing = 0  # requests between arrival and submit
        self._count = threading.Lock()
        self.calls = 0  # generate calls made
        self.answered = 0  # jobs answered in them
        self.largest = 0  # most jobs in one call

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlmtune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the call under way (waiting up to `timeout` seconds for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    @contextmanager
    def preparing(self):
        """Around reading, encoding and submitting one request: the batcher may wait for it."""
        with self._count:
            self._preparing += 1
        try:
            yield
        finally:
            with self._count:
                self._preparing -= 1

    def stats(self) -> dict:
        return {"generate_calls": self.calls, "requests": self.answered, "largest_batch": self.largest,
                "waiting": self._jobs.qsize()}

    def _take(self, block: bool, timeout: float) -> list[Job]:
        """Jobs waiting now (and, when `block`, the first to come within `timeout`)."""
        taken = []
        try:
            if block:
                taken.append(self._jobs.get(timeout=timeout))
            while True:
                taken.append(self._jobs.get_nowait())
        except queue.Empty:
            return taken

    def _run(self) -> None:
        pending: list[Job] = []
        while not self._stop.is_set():
            if not pending:
                pending = self._take(block=True, timeout=0.1)
                if not pending:
                    continue
                deadline = time.monotonic() + self.wait_s
                while (len(pending) < self.max_batch and self._preparing
                       and (left := deadline - time.monotonic()) > 0):
                    pending += self._take(block=True, timeout=min(left, 0.002))
            else:
                pending += self._take(block=False, timeout=0)
            group = pending[0].group
            batch = [job for job in pending if job.group == group][: self.max_batch]
            pending = [job for job in pending if job not in batch]
            self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        def on_text(row: int, piece: str) -> None:
            if batch[row].on_text is not None:
                batch[row].on_text(piece)

        first = batch[0]
        try:
            results = self.generator.complete([j.prompt for j in batch], [j.max_new_tokens for j in batch],
                                              first.sampling, [j.stop for j in batch],
                                              on_text if any(j.on_text for j in batch) else None, first.variant)
        except Exception as e:  # every request of the call learns why; the thread serves the next ones
            results = [e] * len(batch)
        self.calls += 1
        self.answered += len(batch)
        self.largest = max(self.largest, len(batch))
        for job, result in zip(batch, results):
            job.on_done(result)
