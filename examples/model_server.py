#!/usr/bin/env python3
"""A model server: several worker processes answer requests from several clients.

    python examples/model_server.py --workers 3 --clients 4 --calls 500

Each worker loads a "model" (a random numpy matrix, the same in every worker:
seeded) once, then answers requests with ``Service.serve``: a request is a
vector of float32 features, the reply the model's scores.  Each client
process calls from two threads and checks every reply against the scores it
computes itself, so a reply delivered to the wrong call would show.  One
worker is killed halfway (``--kill``): the caller whose request it held,
if it held one, gets ``shmkit.WorkerDied`` (counted under errors), and the
other workers carry on.  At the end: calls, errors by kind, and the median round trip.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import threading
import time

import numpy as np

import shmkit

FEATURES, CLASSES = 64, 10


def model() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((FEATURES, CLASSES)).astype(np.float32)


def worker(name: str) -> None:
    weights = model()

    def predict(data: bytes) -> bytes:
        x = np.frombuffer(data, dtype=np.float32)
        return (x @ weights).astype(np.float32).tobytes()

    with shmkit.Service(name) as svc:
        try:
            svc.serve(predict)
        except KeyboardInterrupt:
            pass


def client(name: str, calls: int, out: "multiprocessing.Queue[dict[str, object]]") -> None:
    weights = model()
    result: dict[str, object] = {"ok": 0, "wrong": 0, "errors": {}, "times": []}
    lock = threading.Lock()
    with shmkit.Client(name, wait_for_worker=10) as c:
        def run(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(calls):
                x = rng.standard_normal(FEATURES).astype(np.float32)
                t0 = time.perf_counter()
                try:
                    reply = c.call(x, timeout=10)
                except shmkit.ShmkitError as e:
                    with lock:
                        errors = result["errors"]
                        assert isinstance(errors, dict)
                        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                dt = time.perf_counter() - t0
                good = np.allclose(np.frombuffer(reply, np.float32), x @ weights, atol=1e-4)
                with lock:
                    result["ok" if good else "wrong"] += 1  # type: ignore[operator]
                    result["times"].append(dt)  # type: ignore[attr-defined]

        threads = [threading.Thread(target=run, args=(os.getpid() * 10 + k,))
                   for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"model-{os.getpid()}")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--calls", type=int, default=500, help="calls per client thread")
    parser.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                        help="SIGKILL one worker halfway")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    svc = shmkit.Service(args.name)
    try:
        workers = [ctx.Process(target=worker, args=(args.name,)) for _ in range(args.workers)]
        for p in workers:
            p.start()
        out: multiprocessing.Queue[dict[str, object]] = ctx.Queue()
        clients = [ctx.Process(target=client, args=(args.name, args.calls, out))
                   for _ in range(args.clients)]
        for p in clients:
            p.start()
        if args.kill and args.workers > 1:
            while svc.statistics()["served"] < args.clients * args.calls:
                time.sleep(0.01)
            os.kill(workers[0].pid or 0, signal.SIGKILL)
            print(f"killed worker pid {workers[0].pid}")
        results = [out.get(timeout=600) for _ in clients]
        for p in clients:
            p.join()
        ok = sum(int(r["ok"]) for r in results)  # type: ignore[call-overload]
        wrong = sum(int(r["wrong"]) for r in results)  # type: ignore[call-overload]
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():  # type: ignore[attr-defined]
                errors[k] = errors.get(k, 0) + v
        times = [t for r in results for t in r["times"]]  # type: ignore[attr-defined]
        print(f"calls answered: {ok}, wrong replies: {wrong}, errors: {errors or 'none'}")
        if times:
            print(f"median round trip: {statistics.median(times) * 1e6:.0f} µs")
        print("service:", svc.statistics())
        for p in workers:
            if p.is_alive():
                os.kill(p.pid or 0, signal.SIGINT)
        for p in workers:
            p.join(10)
        return 0 if wrong == 0 else 1
    finally:
        svc.unlink()
        svc.close()


if __name__ == "__main__":
    raise SystemExit(main())
