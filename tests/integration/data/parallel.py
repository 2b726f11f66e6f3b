"""Real parallel processes for the concurrency tests: each job prepares (imports, clients) in its own
spawned process, all wait at one barrier, then act at once; results come back in job order."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

BARRIER_TIMEOUT_S = 180  # spawned children import pandas, boto3, GX on a busy 2-core machine


def _entry(job: Callable[..., Callable[[], Any]], args: tuple, barrier, results, index: int) -> None:
    try:
        act = job(*args)
        barrier.wait(BARRIER_TIMEOUT_S)
        results.put((index, act()))
    except BaseException as err:  # reported to the test, which fails naming it
        results.put((index, {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}))


def run_parallel(job: Callable[..., Callable[[], Any]], arg_list: list[tuple], timeout_s: float = 600) -> list[Any]:
    """Run ``job(*args)`` for each args in its own process; the callables they return run together."""
    return run_together([(job, args) for args in arg_list], timeout_s)


def run_together(calls: list[tuple[Callable[..., Callable[[], Any]], tuple]], timeout_s: float = 600) -> list[Any]:
    """Each (job, args) in its own process, released together; results in call order."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent holding client threads and sockets
    barrier, results = ctx.Barrier(len(calls)), ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(job, a, barrier, results, i)) for i, (job, a) in enumerate(calls)]
    for proc in procs:
        proc.start()
    collected = dict(results.get(timeout=timeout_s) for _ in procs)
    for proc in procs:
        proc.join(30)
    return [collected[i] for i in range(len(procs))]


def start_one(job: Callable[..., Callable[[], Any]], args: tuple):
    """Start ``job`` in its own process and return it (to be killed by the test)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(1), ctx.Queue()
    proc = ctx.Process(target=_entry, args=(job, args, barrier, results, 0))
    proc.start()
    proc.kept = (barrier, results)  # alive until the child has unpickled them
    return proc
