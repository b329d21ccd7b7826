"""Benchmark harness: workloads, discovery, calibration and interleaved runs.

A topic module ``benchmarks/bench_<topic>.py`` declares one function per system::

    @workload("lock: uncontended acquire+release", unit="ns/op", reference=True)
    def threading_lock(n: int) -> float:
        lock = threading.Lock()                     # setup, not timed
        t0 = time.perf_counter()
        for _ in range(n):
            lock.acquire(); lock.release()
        return time.perf_counter() - t0             # elapsed seconds for the n ops

All systems of one benchmark are measured in the same run, interleaved across repeats,
and compared with the benchmark's reference system. Reports (rich tables, Markdown,
JSON) live in ``benchmarks/__main__.py``; README.md tells how to add a workload.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
PACKAGE_DIR = Path(__file__).resolve().parent
MAX_N = 10**9

#: unit -> (kind, scale). "time" units are lower-is-better, "rate" and "bytes" higher.
UNITS: dict[str, tuple[str, float]] = {
    "s/op": ("time", 1.0), "ms/op": ("time", 1e3), "µs/op": ("time", 1e6),
    "us/op": ("time", 1e6), "ns/op": ("time", 1e9), "µs round trip": ("time", 1e6),
    "ops/s": ("rate", 1.0), "kops/s": ("rate", 1e-3), "Mops/s": ("rate", 1e-6),
    "MB/s": ("bytes", 1e-6), "GB/s": ("bytes", 1e-9),
    "MiB/s": ("bytes", 2.0**-20), "GiB/s": ("bytes", 2.0**-30),
}


def convert(unit: str, seconds: float, ops: int, bytes_per_op: int | None = None) -> float:
    """Turn ``seconds`` spent on ``ops`` operations into ``unit``.

    >>> convert("ns/op", 0.5, 1000), convert("GB/s", 1.0, 1000, bytes_per_op=10**6)
    (500000.0, 1.0)
    """
    kind, scale = UNITS[unit]
    if kind == "time":
        return seconds / ops * scale
    if kind == "rate":
        return ops / seconds * scale
    return ops * (bytes_per_op or 0) / seconds * scale


@dataclass
class Workload:
    """One system's implementation of one benchmark."""

    func: Callable[[int], Any]
    benchmark: str
    system: str | None = None  # default: the function's name
    unit: str = "ns/op"
    group: str | None = None  # default: <topic> of the bench_<topic> module defining func
    requires: tuple[str, ...] = ()
    reference: bool = False
    n: int | None = None
    bytes_per_op: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if UNITS[self.unit][0] == "bytes" and not self.bytes_per_op:
            raise ValueError(f"unit {self.unit!r} needs bytes_per_op")
        self.system = self.system or self.func.__name__
        if self.group is None:
            module = (getattr(self.func, "__module__", None) or "").rpartition(".")[2]
            self.group = module[6:] if module.startswith("bench_") else ""
        self.requires = tuple(self.requires)


class Registry:
    """An ordered collection of workloads; :data:`REGISTRY` is the default one.

    >>> reg = Registry(); _ = reg.add(lambda n: n * 1e-9, "noop", system="nothing")
    >>> {b: [w.system for w in ws] for b, ws in reg.benchmarks().items()}
    {'noop': ['nothing']}
    """

    def __init__(self) -> None:
        self.workloads: list[Workload] = []
        self.load_errors: dict[str, str] = {}  # module path -> error raised while importing it

    def workload(self, benchmark: str, **options: Any) -> Callable[[F], F]:
        """Decorator registering a workload here; options as for :func:`workload`."""
        def decorate(func: F) -> F:
            self.add(func, benchmark, **options)
            return func
        return decorate

    def add(self, func: Callable[[int], Any], benchmark: str, **options: Any) -> Workload:
        """Register ``func`` as a system of ``benchmark`` (options as for :func:`workload`);
        ``unit`` and ``bytes_per_op`` default to those of the benchmark's first system."""
        prior = [o for o in self.workloads if o.benchmark == benchmark]
        for key, default in (("unit", "ns/op"), ("bytes_per_op", None)):
            if options.get(key) is None:
                options[key] = getattr(prior[0], key) if prior else default
        w = Workload(func, benchmark, **options)
        for other in prior:
            if other.system == w.system:
                raise ValueError(f"{benchmark!r}: system {w.system!r} registered twice")
            if other.reference and w.reference:
                raise ValueError(f"{benchmark!r}: two references ({other.system}, {w.system})")
            if other.unit != w.unit:
                raise ValueError(f"{benchmark!r}: unit {w.unit!r} differs from {other.unit!r}")
        self.workloads.append(w)
        return w

    def benchmarks(self, filter: str | None = None) -> dict[str, list[Workload]]:
        """Workloads by benchmark, in registration order. ``filter`` is a case-insensitive
        substring of group, benchmark or system; a benchmark's reference is kept
        whenever any of its systems matches, so ratios stay available."""
        f = (filter or "").lower()
        hit = [f in f"{w.group}\0{w.benchmark}\0{w.system}".lower() for w in self.workloads]
        wanted = {w.benchmark for w, h in zip(self.workloads, hit) if h}
        out: dict[str, list[Workload]] = {}
        for w, h in zip(self.workloads, hit):
            if h or (w.reference and w.benchmark in wanted):
                out.setdefault(w.benchmark, []).append(w)
        return out


REGISTRY = Registry()
_active: list[Registry] = [REGISTRY]


def workload(benchmark: str, *, unit: str | None = None, group: str | None = None,
             system: str | None = None, requires: tuple[str, ...] = (), reference: bool = False,
             n: int | None = None, bytes_per_op: int | None = None) -> Callable[[F], F]:
    """Declare the decorated ``func(n) -> seconds`` as one system of ``benchmark``.

    The function runs ``n`` operations and returns the elapsed seconds (setup excluded),
    or a dict with ``"seconds"``, optionally ``"ops"`` (operations actually done, if not n)
    and any other numbers as extra metrics (their median is reported).
    ``unit`` defaults to the benchmark's first system's, else ``"ns/op"`` (see :data:`UNITS`);
    ``system`` defaults to the function name, ``group`` to the ``<topic>`` of
    ``bench_<topic>.py``; ``requires`` lists modules whose absence skips the system;
    ``reference=True`` marks the system ratios are computed against; ``n`` fixes the
    iteration count; ``bytes_per_op`` is needed by the byte-rate units.

    >>> @workload("pipe: 1 KiB round trip", unit="µs round trip", requires=("faster_fifo",))
    ... def faster_fifo_queue(n):
    ...     return {"seconds": n * 2e-6, "p99_us": 3.5}
    """
    return _active[-1].workload(benchmark, unit=unit, group=group, system=system,
                                requires=requires, reference=reference, n=n,
                                bytes_per_op=bytes_per_op)


def discover(directory: str | Path | None = None, registry: Registry | None = None) -> list[str]:
    """Import every ``bench_*.py`` in ``directory`` (default: this package) into
    ``registry`` (default: :data:`REGISTRY`); return the module names loaded.
    A module that fails to import is recorded in ``registry.load_errors``.

    >>> discover("benchmarks", Registry())  # doctest: +SKIP
    ['benchmarks.bench_sync', ...]
    """
    registry = REGISTRY if registry is None else registry
    directory = Path(directory or PACKAGE_DIR).resolve()
    loaded = []
    for path in sorted(directory.glob("bench_*.py")):
        name = (f"benchmarks.{path.stem}" if directory == PACKAGE_DIR
                else f"_benchdir_{abs(hash(str(directory))):x}.{path.stem}")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        _active.append(registry)  # so that @workload registers there
        before = len(registry.workloads)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken topic must not stop the others
            del registry.workloads[before:]  # nor run half of itself
            sys.modules.pop(name, None)
            registry.load_errors[str(path)] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            _active.pop()
        loaded.append(name)
    return loaded


@dataclass
class Result:
    """What one system scored on one benchmark; ``values`` are per-repeat, in ``unit``."""

    benchmark: str
    system: str
    group: str
    unit: str
    reference: bool = False
    status: str = "ok"  # "ok" | "skipped" | "error"
    message: str = ""
    n: int = 0
    values: list[float] = field(default_factory=list)
    median: float | None = None
    min: float | None = None
    max: float | None = None
    ratio: float | None = None  # median / reference median
    extras: dict[str, float] = field(default_factory=dict)
    detail: str = ""  # traceback of an error


def _call(w: Workload, n: int) -> tuple[float, int, dict[str, float]]:
    out = w.func(n)
    extras: dict[str, float] = {}
    seconds, ops = out, n
    if isinstance(out, dict):
        if "seconds" not in out:
            raise TypeError("a workload's dict must hold 'seconds'")
        out = dict(out)
        seconds, ops = out.pop("seconds"), int(out.pop("ops", n))
        extras = {k: float(v) for k, v in out.items()}
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"workload must return elapsed seconds, got {type(seconds).__name__}")
    if not (seconds > 0 and math.isfinite(seconds)) or ops < 1:
        raise ValueError(f"bad measurement: {seconds!r} s for {ops} ops")
    return float(seconds), ops, extras


def calibrate(w: Workload, target: float = 0.2) -> int:
    """The ``n`` for which one call of ``w`` takes about ``target`` seconds
    (``w.n`` if the workload fixes it). Calibration calls double as warm-up.

    >>> calibrate(Workload(lambda n: n * 1e-6, "b", "s"), target=0.2)
    200000
    """
    if w.n:
        return w.n
    n = 1
    while True:
        t = _call(w, n)[0]
        if n == 1 and t >= target / 5:
            # A first call can pay what no later one does (an import, a
            # spawn, first touches): timed alone it would make n tiny, and
            # each round then mostly that round's own fixed costs.
            t = min(t, _call(w, n)[0])
        if t >= target / 5 or n >= MAX_N:
            return max(1, min(MAX_N, round(n * target / t)))
        n = min(MAX_N, n * 10, max(n * 2, math.ceil(n * target / 4 / t)))


def importable(name: str) -> bool:
    """Whether ``import name`` succeeds (any exception counts as not installed).

    >>> importable("json"), importable("no_such_module_here")
    (True, False)
    """
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def _fail(r: Result, exc: BaseException) -> None:
    r.status, r.message = "error", f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    r.detail = "".join(["Traceback (most recent call last):\n", *traceback.format_list(frames),
                        *traceback.format_exception_only(type(exc), exc)])


def run(registry: Registry | None = None, *, repeat: int = 5, target: float = 0.2,
        n: int | None = None, filter: str | None = None,
        on_progress: Callable[[int, int, str], None] | None = None) -> list[Result]:
    """Run every benchmark: calibrate each system, then ``repeat`` rounds in
    interleaved order (ABCABC). ``n`` overrides calibration for all workloads;
    ``on_progress(done, total, label)`` is called before each step (``label`` names
    it) and once at the end with ``done == total``.

    >>> reg = Registry(); _ = reg.add(lambda n: n * 1e-6, "noop", system="fake", reference=True)
    >>> [(r.system, r.median, r.ratio) for r in run(reg, repeat=2)]
    [('fake', 1000.0, 1.0)]
    """
    registry = REGISTRY if registry is None else registry
    benches = registry.benchmarks(filter)
    total = sum(len(ws) for ws in benches.values()) * (repeat + 1)
    done = 0

    def step(label: str) -> None:
        nonlocal done
        if on_progress:
            on_progress(done, total, label)
        done += 1

    results: list[Result] = []
    for bench, ws in benches.items():
        rs = [Result(bench, w.system, w.group, w.unit, w.reference) for w in ws]
        samples: list[dict[str, list[float]]] = [{} for _ in ws]
        for w, r in zip(ws, rs):
            step(f"{bench} · {w.system} · calibrate")
            if missing := [m for m in w.requires if not importable(m)]:
                r.status, r.message = "skipped", f"not installed: {', '.join(missing)}"
            else:
                try:
                    r.n = n or calibrate(w, target)
                except Exception as exc:
                    _fail(r, exc)
        for i in range(repeat):
            for w, r, extra in zip(ws, rs, samples):
                step(f"{bench} · {w.system} · {i + 1}/{repeat}")
                if r.status == "ok":
                    try:
                        seconds, ops, extras = _call(w, r.n)
                        r.values.append(convert(w.unit, seconds, ops, w.bytes_per_op))
                        for k, v in extras.items():
                            extra.setdefault(k, []).append(v)
                    except Exception as exc:
                        _fail(r, exc)
        for r, extra in zip(rs, samples):
            if r.status == "ok" and r.values:
                r.median = statistics.median(r.values)
                r.min, r.max = min(r.values), max(r.values)
                r.extras = {k: statistics.median(v) for k, v in extra.items()}
        ref = next((r for r in rs if r.reference and r.median), None)
        for r in rs:
            if ref and r.median is not None:
                r.ratio = r.median / ref.median
        results.extend(rs)
    if on_progress:
        on_progress(total, total, "done")
    return results
