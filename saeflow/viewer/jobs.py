"""Background jobs for the viewer: model work runs in one worker thread, pages poll by job id.

The model is loaded lazily by the first job (the atlas alone needs no model). One job runs at a
time; a few more may wait in a bounded queue and the rest are refused (the server answers 429),
so a burst of steering requests cannot pile up unbounded work. Finished jobs are kept for
polling; the oldest are forgotten past ``keep``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """Too many jobs are waiting."""


class Cancelled(RuntimeError):
    """The job was cancelled (the viewer is stopping)."""


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued, loading, running, done, error
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    data: dict = field(default_factory=dict)  # what the job reports (progress, texts, ...)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """Long steps check it (``check``) and stop."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (done or error); False on timeout."""
        return self._done.wait(timeout)

    def wait_cancel(self, timeout: float | None = None) -> bool:
        """Block until the job is cancelled; False on timeout."""
        return self._cancel.wait(timeout)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled: the viewer is stopping")

    def update(self, **fields) -> None:
        with self._lock:
            self.data.update(fields)

    def append(self, key: str, text: str) -> None:
        with self._lock:
            self.data[key] = self.data.get(key, "") + text

    def to_json(self) -> dict:
        with self._lock:
            data = dict(self.data)
        elapsed = None
        if self.started:
            elapsed = round((self.finished or time.time()) - self.started, 3)
        return {"id": self.id, "kind": self.kind, "status": self.status, "error": self.error,
                "elapsed": elapsed, **data}


class Worker:
    """Runs ``fn(job, resources)`` one job at a time; ``load()`` builds ``resources`` once."""

    def __init__(self, load: Callable[[], object] | None, max_queued: int = 4, keep: int = 200):
        self._load = load
        self._resources = None
        self._load_error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._keep = keep
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.current: Job | None = None

    @property
    def loaded(self) -> bool:
        return self._resources is not None

    @property
    def available(self) -> bool:
        return self._load is not None or self._resources is not None

    def set_resources(self, resources) -> None:
        self._resources = resources

    def status(self) -> dict:
        return {"available": self.available, "model_loaded": self.loaded,
                "busy": self.current is not None, "queued": self._queue.qsize(),
                "load_error": self._load_error}

    def submit(self, kind: str, fn: Callable[[Job, object], None]) -> Job:
        if self._closed:
            raise QueueFull("the viewer is stopping")
        job = Job(id=f"{kind}-{next(self._ids)}", kind=kind)
        try:
            self._queue.put_nowait((job, fn))
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} jobs are already waiting; try again when "
                            "one has finished") from None
        with self._jobs_lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
        self._ensure_thread()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._jobs_lock:
            return self._jobs.get(job_id)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="saeflow-viewer-worker",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running and waiting jobs and stop the worker thread."""
        self._closed = True
        with self._jobs_lock:
            for job in self._jobs.values():
                job.cancel()
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put_nowait((None, None))
            except queue.Full:
                pass
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job, fn = self._queue.get()
            if job is None or self._closed:
                if job is not None:
                    job.status, job.error = "error", "cancelled: the viewer is stopping"
                    job._done.set()
                self._queue.task_done()
                if job is None:
                    return
                continue
            self.current = job
            job.started = time.time()
            try:
                if self._resources is None:
                    if self._load is None:
                        raise RuntimeError("no model is available to this viewer")
                    job.status = "loading"
                    self._resources = self._load()
                    self._load_error = None
                job.check()
                job.status = "running"
                fn(job, self._resources)
                job.status = "done"
            except Cancelled as e:
                job.error, job.status = str(e), "error"
            except Exception as e:  # the job reports it; the worker keeps serving
                job.error = f"{type(e).__name__}: {e}"
                job.status = "error"
                if self._resources is None:
                    self._load_error = job.error
                traceback.print_exc()
            finally:
                job.finished = time.time()
                self.current = None
                job._done.set()
                self._queue.task_done()
