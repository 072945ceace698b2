"""The Dask path (the cluster map): ``--scheduler ADDRESS`` (a running cluster) or ``--workers N``
(a local cluster of N processes) for ``awe score`` and ``awe build-g``.

Work is a list of small tasks (a row group to score, a range of query rows to search) mapped over
the workers with :func:`map_ordered`: a bounded number in flight, results taken in task order, so
the driver writes the same bytes as a local run whatever order the workers finish in. Every
worker process loads the model (or the saved index) once, on its first task, and keeps it for the
next ones (:func:`worker_cached`); tasks carry only paths and options. Workers read the input
files and the model directory by path: on a cluster they must see the same file system.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from awe.errors import AweError, invalid

INSTALL_HINT = "pip install 'awe[dask]'"

# per worker process: what it loaded (kind -> (key, value)) and how many times (for the tests)
_CACHE: dict[str, tuple[tuple, object]] = {}
LOADS: Counter = Counter()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ClusterOptions:
    scheduler: str | None = None  # address of a running Dask scheduler
    workers: int | None = None  # or: a local cluster of this many worker processes

    def __post_init__(self):
        if self.scheduler and self.workers:
            raise AweError("give --scheduler or --workers, not both")
        if self.workers is not None and self.workers < 1:
            raise invalid("workers", f"must be >= 1, got {self.workers!r}")

    @classmethod
    def from_options(cls, scheduler: str | None, workers: int | None) -> ClusterOptions | None:
        """None (run in this process) unless one of the two options is given."""
        if not scheduler and workers is None:
            return None
        return cls(scheduler or None, workers)


def _require_dask():
    try:
        import distributed
    except ImportError:
        raise AweError(f"--workers / --scheduler need Dask, which is not installed: "
                       f"{INSTALL_HINT}") from None
    return distributed


@contextlib.contextmanager
def dask_client(options: ClusterOptions) -> Iterator:
    """A Dask client on the scheduler, or on a local cluster of processes (closed after)."""
    distributed = _require_dask()
    import logging

    if options.scheduler:
        try:
            client = distributed.Client(options.scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise AweError(f"--scheduler {options.scheduler}: cannot connect ({exc}); start "
                           f"one with `dask scheduler`, or use --workers N") from exc
        with client:
            yield client
        return
    cores = os.cpu_count() or 1
    # one task at a time per worker: a task's model uses its own threads (threads_per_worker)
    with distributed.LocalCluster(n_workers=options.workers, threads_per_worker=1,
                                  processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR,
                                  memory_limit=0) as cluster, distributed.Client(cluster) as client:
        try:
            client.wait_for_workers(options.workers, timeout=120)
        except TimeoutError as exc:
            raise AweError(f"--workers {options.workers}: the local Dask workers did not start "
                           f"within 120 s ({exc})") from exc
        client.awe_threads = max(1, cores // options.workers)  # torch/faiss threads per worker
        yield client


def threads_per_worker(client) -> int:
    """torch/faiss threads a worker's task uses when --threads is not given: the machine's
    cores shared among the local workers, or each remote worker's own Dask thread count."""
    threads = getattr(client, "awe_threads", None)
    if threads:
        return threads
    info = client.scheduler_info().get("workers", {})
    counts = [w.get("nthreads", 1) for w in info.values()]
    return max(1, min(counts)) if counts else 1


def map_ordered(client, fn: Callable, argument_lists: Iterable[tuple],
                window: int | None = None) -> Iterator:
    """``fn(*args)`` for every tuple of arguments on the cluster, yielding the results in order
    with at most ``window`` tasks in flight (memory: that many results, not all of them). A
    task's error is raised when its turn comes; the tasks still in flight are cancelled."""
    if window is None:
        n_workers = len(client.scheduler_info().get("workers", {})) or 1
        window = 2 * n_workers
    pending: deque = deque()
    try:
        for args in argument_lists:
            pending.append(client.submit(fn, *args, pure=False))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        if pending:
            client.cancel(list(pending))


def worker_cached(kind: str, key: tuple, make: Callable[[], object]):
    """The value of ``make()`` for ``key``, made once per process; a new key of the same kind
    replaces the old value (a retrained model, the next build's index)."""
    with _LOCK:
        cached = _CACHE.get(kind)
        if cached is None or cached[0] != key:
            _CACHE.pop(kind, None)  # free the old one before loading the new one
            _CACHE[kind] = (key, make())
            LOADS[kind] += 1
        return _CACHE[kind][1]


def loads() -> dict[str, int]:
    """What this process loaded, and how many times: run on every worker by the tests."""
    return dict(LOADS)
