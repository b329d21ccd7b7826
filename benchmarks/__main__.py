"""Run shmkit's benchmarks and report them as rich tables, Markdown and JSON.

    python -m benchmarks --list                   # what would run, and what is installed
    python -m benchmarks --filter sync            # one topic, rich tables on stdout
    python -m benchmarks --markdown docs/benchmarks.md --json results.json

Exit status: 0, or 1 when a workload or a bench module raised (the run still completes).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.harness import UNITS, Registry, Result, Workload, discover, importable, run

HEADER = ["system", "median", "min", "max", "vs reference", "n", "notes"]


def machine_facts() -> dict[str, str]:
    """CPU, cores, memory, kernel, Python, numpy and date of this machine.

    >>> list(machine_facts())
    ['CPU', 'cores', 'memory', 'kernel', 'Python', 'numpy', 'date']
    """
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    cpu = re.search(r"^model name\s*:\s*(.+)$", read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", read("/proc/meminfo"), re.M)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import numpy
        np_version = numpy.__version__
    except Exception:
        np_version = "not installed"
    return {
        "CPU": cpu.group(1).strip() if cpu else (platform.processor() or platform.machine()),
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "memory": f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt(v: float | None) -> str:
    """Three significant figures (whole numbers from 100 up), no exponent for everyday sizes.

    >>> fmt(1234.5), fmt(99.97), fmt(10.0), fmt(0.012345), fmt(None)
    ('1,234', '100', '10.0', '0.0123', '—')
    """
    if v is None:
        return "—"
    if abs(v) >= 99.95:
        return f"{v:,.0f}"
    return f"{v:#.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def by_benchmark(results: list[Result]) -> dict[str, list[Result]]:
    """Results grouped by benchmark, in run order."""
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r.benchmark, []).append(r)
    return out


def title(entries: Sequence[Result | Workload], group: bool = True) -> str:
    """``group · benchmark (unit, lower/higher is better)`` for one benchmark.

    >>> title([Result("lock: acquire", "x", "sync", "ns/op")])
    'sync · lock: acquire (ns/op, lower is better)'
    """
    e = entries[0]
    better = "lower" if UNITS[e.unit][0] == "time" else "higher"
    prefix = f"{e.group} · " if group and e.group else ""
    return f"{prefix}{e.benchmark} ({e.unit}, {better} is better)"


def rows(results: list[Result]) -> list[list[str]]:
    """One benchmark's table rows, as text, in :data:`HEADER` order."""
    out = []
    for r in results:
        name = r.system + (" (reference)" if r.reference else "")
        if r.status != "ok":
            note = r.message if r.status == "skipped" else f"error: {r.message}"
            out.append([name, "—", "—", "—", "—", "—", note])
            continue
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        notes = ", ".join(f"{k}={fmt(v)}" for k, v in r.extras.items())
        out.append([name, fmt(r.median), fmt(r.min), fmt(r.max), ratio, f"{r.n:,}", notes])
    return out


def to_markdown(results: list[Result], facts: dict[str, str], settings: str = "") -> str:
    """The results as Markdown: machine facts, then a section per group and a table
    per benchmark.

    >>> print(to_markdown([], {"CPU": "x"}).splitlines()[0])
    # shmkit benchmarks
    """
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |"

    out = ["# shmkit benchmarks", "", line(["machine", ""]), line(["---", "---"])]
    out += [line([k, v]) for k, v in facts.items()]
    out += ["", settings] if settings else []
    group = None
    for rs in by_benchmark(results).values():
        if rs[0].group != group:
            group = rs[0].group
            out += ["", f"## {group or 'other'}"]
        out += ["", f"### {title(rs, group=False)}", "", line(HEADER),
                line(["---"] + ["---:"] * 5 + ["---"])]
        out += [line(row) for row in rows(rs)]
    return "\n".join(out) + "\n"


def print_tables(results: list[Result], console: Any) -> None:
    """Print one rich table per benchmark on ``console`` (a ``rich.console.Console``)."""
    from rich.table import Table
    from rich.text import Text

    for rs in by_benchmark(results).values():
        table = Table(title=Text(title(rs)), title_justify="left")
        for h in HEADER:
            table.add_column(h, justify="left" if h in ("system", "notes") else "right",
                             no_wrap=h != "notes")
        for r, row in zip(rs, rows(rs)):
            style = {"skipped": "dim", "error": "red"}.get(r.status, "bold" if r.reference else "")
            table.add_row(*map(Text, row), style=style)
        console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options.

    >>> parse_args(["--quick"]).repeat
    2
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="measured rounds per system (default 5)")
    p.add_argument("--target", type=float, default=None, metavar="SECONDS",
                   help="calibrate n so one round takes this long (default 0.2)")
    p.add_argument("--n", type=int, default=None, help="fixed iteration count, no calibration")
    p.add_argument("--quick", action="store_true", help="2 rounds of ~0.05 s: a smoke run")
    p.add_argument("--filter", default=None, metavar="SUBSTR",
                   help="only benchmarks whose group, name or system contains SUBSTR")
    p.add_argument("--json", type=Path, metavar="PATH", help="write raw results as JSON")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--list", action="store_true", help="list benchmarks and systems, run nothing")
    p.add_argument("--dir", type=Path, default=None,
                   help="discover bench_*.py in DIR instead of the benchmarks package")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.target = args.target or (0.05 if args.quick else 0.2)
    if args.repeat < 1 or args.target <= 0 or (args.n is not None and args.n < 1):
        p.error("--repeat, --target and --n must be positive")
    return args


def main(argv: list[str] | None = None, registry: Registry | None = None) -> int:
    """Run the command line; ``registry`` skips discovery (for tests and scripts).

    >>> main(["--list", "--filter", "sync"])  # doctest: +SKIP
    sync · lock: uncontended acquire+release (ns/op, lower is better)
      threading_lock (reference)
    0
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    if registry is None:
        registry = Registry()
        discover(args.dir, registry)
    for path, err in registry.load_errors.items():
        console.print(f"could not import {path}: {err}", style="red", markup=False)
    broken = 1 if registry.load_errors else 0
    benches = registry.benchmarks(args.filter)
    if args.list:
        for ws in benches.values():
            console.print(title(ws), style="bold", markup=False)
            for w in ws:
                missing = [m for m in w.requires if not importable(m)]
                note = f" (not installed: {', '.join(missing)})" if missing else ""
                ref = " (reference)" if w.reference else ""
                console.print(f"  {w.system}{ref}{note}", markup=False, highlight=False)
        return broken
    if not benches:
        matching = f" matching {args.filter!r}" if args.filter else ""
        console.print(f"no benchmarks to run{matching}", markup=False)
        return broken

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        results = run(registry, repeat=args.repeat, target=args.target, n=args.n,
                      filter=args.filter,
                      on_progress=lambda done, total, label: progress.update(
                          task, completed=done, total=total, description=label))
    print_tables(results, console)

    facts = machine_facts()
    if args.markdown:
        how = ("n calibrated per system" if args.n is None else f"n = {args.n:,}")
        settings = (f"Median, min and max of {args.repeat} interleaved repeats of "
                    f"~{args.target:g} s each ({how}); "
                    "“vs reference” is the median over the reference system's median.")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(results, facts, settings))
    if args.json:
        payload = {"machine": facts, "settings": {"repeat": args.repeat, "target": args.target,
                                                  "n": args.n, "filter": args.filter},
                   "load_errors": registry.load_errors,
                   "results": [dataclasses.asdict(r) for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        console.print(f"{r.benchmark} · {r.system}:", style="red", markup=False)
        console.print(r.detail, markup=False, highlight=False)
    return 1 if failed else broken


if __name__ == "__main__":
    sys.exit(main())
