"""The benchmark harness itself, on trivial workloads (no C core needed, a few seconds)."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives at the repository root, beside `src`
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import main, to_markdown  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Registry, Workload, calibrate, convert, discover, run,
)


def made_up(per_op: float, log: list[str] | None = None, name: str = ""):
    """A workload that claims ``per_op`` seconds per operation, instantly."""
    def f(n: int) -> float:
        if log is not None:
            log.append(name)
        return n * per_op
    f.__name__ = name or "made_up"
    return f


def spin(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return time.perf_counter() - t0


def test_calibration_aims_at_the_target_time():
    assert calibrate(Workload(made_up(1e-6), "b"), target=0.2) == pytest.approx(200_000, rel=1e-6)
    assert calibrate(Workload(made_up(1e-3), "b"), target=0.05) == pytest.approx(50, rel=1e-6)
    assert calibrate(Workload(made_up(5.0), "b"), target=0.2) == 1  # slower than the target
    assert calibrate(Workload(made_up(1.0), "b", n=7)) == 7  # the workload fixes n
    n = calibrate(Workload(spin, "b"), target=0.05)
    # real time, loose bounds: a loaded machine slows the calibration or the runs
    assert 0.001 < min(spin(n) for _ in range(3)) < 0.25


def test_a_slow_first_call_does_not_set_n():
    # As a workload whose first call imports a module or starts a worker.
    calls: list[int] = []

    def first_slow(n: int) -> float:
        calls.append(n)
        return n * 1e-4 + (0.5 if len(calls) == 1 else 0.0)

    assert calibrate(Workload(first_slow, "b"), target=0.2) == pytest.approx(2000, rel=1e-6)
    assert calls[:2] == [1, 1]


def test_systems_interleave_and_ratios_use_the_reference():
    log: list[str] = []
    reg = Registry()
    reg.add(made_up(2e-6, log, "B"), "echo")
    reg.add(made_up(1e-6, log, "A"), "echo", reference=True)
    reg.add(made_up(0.5e-6, log, "C"), "echo")
    results = run(reg, repeat=3, n=1000)
    assert log == ["B", "A", "C"] * 3  # ABCABC, no calibration calls with a fixed n
    by = {r.system: r for r in results}
    assert by["A"].median == pytest.approx(1000.0) and by["A"].ratio == pytest.approx(1.0)
    assert by["B"].ratio == pytest.approx(2.0) and by["C"].ratio == pytest.approx(0.5)
    assert all(len(r.values) == 3 and r.n == 1000 for r in results)
    assert (by["B"].min, by["B"].max) == (pytest.approx(2000.0), pytest.approx(2000.0))


def test_calibrated_run_reports_progress_and_rates():
    reg = Registry()
    reg.add(lambda n: {"seconds": n * 1e-9, "p99_us": 4.0}, "copy", system="memcpy",
            unit="GB/s", bytes_per_op=1000, reference=True)
    reg.add(made_up(4e-9), "copy", system="slow", unit="GB/s", bytes_per_op=1000)
    steps: list[tuple[int, int]] = []
    results = run(reg, repeat=2, target=0.05, on_progress=lambda d, t, _: steps.append((d, t)))
    fast, slow = results
    assert fast.median == pytest.approx(1000.0) and slow.ratio == pytest.approx(0.25)
    assert fast.n == pytest.approx(50_000_000, rel=1e-6)
    assert fast.extras == {"p99_us": 4.0}
    assert steps == [(d, 6) for d in range(7)]
    assert convert("ops/s", 2.0, 1000) == 500.0 and convert("µs round trip", 1.0, 10) == 1e5


def test_a_failing_workload_is_an_error_and_the_run_goes_on():
    calls = {"later": 0}

    def later(n: int) -> float:
        calls["later"] += 1
        if calls["later"] > 2:  # calibration and the first repeat pass
            raise RuntimeError("lost the segment")
        return n * 1e-6

    reg = Registry()
    reg.add(made_up(1e-6), "b", system="ok", reference=True)
    reg.add(lambda n: 1 / 0, "b", system="at_once")
    reg.add(later, "b")
    reg.add(lambda n: None, "b", system="no_time")
    by = {r.system: r for r in run(reg, repeat=3, target=0.01)}
    assert by["ok"].status == "ok" and len(by["ok"].values) == 3
    assert by["at_once"].status == "error" and "ZeroDivisionError" in by["at_once"].message
    assert by["later"].status == "error" and "lost the segment" in by["later"].message
    assert by["later"].median is None and by["later"].ratio is None
    detail = by["later"].detail  # the workload's frames, not the harness's
    assert "raise RuntimeError" in detail and "benchmarks/harness.py" not in detail
    assert by["no_time"].status == "error" and "elapsed seconds" in by["no_time"].message


def test_a_missing_requirement_is_skipped_not_run():
    ran: list[str] = []
    reg = Registry()
    reg.add(made_up(1e-6), "b", system="pipe", reference=True)
    reg.add(made_up(1e-6, ran, "ff"), "b", requires=("json", "shmkit_bench_no_such_module"))
    pipe, ff = run(reg, repeat=2, target=0.01)
    assert ff.status == "skipped"
    assert ff.message == "not installed: shmkit_bench_no_such_module"
    assert ran == [] and pipe.status == "ok"


def test_registration_checks():
    reg = Registry()
    reg.add(made_up(1e-6), "b", system="x", reference=True)
    with pytest.raises(ValueError, match="twice"):
        reg.add(made_up(1e-6), "b", system="x")
    with pytest.raises(ValueError, match="two references"):
        reg.add(made_up(1e-6), "b", system="y", reference=True)
    with pytest.raises(ValueError, match="unknown unit"):
        reg.add(made_up(1e-6), "c", unit="furlongs")
    with pytest.raises(ValueError, match="bytes_per_op"):
        reg.add(made_up(1e-6), "c", unit="GB/s")
    with pytest.raises(ValueError, match="differs"):
        reg.add(made_up(1e-6), "b", system="z", unit="ops/s")
    reg.add(made_up(1e-6), "d", unit="GB/s", bytes_per_op=64)
    later = reg.add(made_up(1e-6), "d", system="later")  # unit and size follow the first
    assert (later.unit, later.bytes_per_op) == ("GB/s", 64)


TOPIC = '''
from benchmarks.harness import workload

@workload("echo: 1 KiB", unit="µs round trip", reference=True)
def multiprocessing_pipe(n):
    return n * 10e-6

@workload("echo: 1 KiB", system="shmkit.Channel")
def channel(n):
    return {"seconds": n * 2.5e-6, "p99_us": 7}

@workload("echo: 1 KiB", requires=("shmkit_bench_no_such_module",))
def faster_fifo(n):
    return n * 1e-6

@workload("echo: 1 KiB")
def broken(n):
    raise OSError("no space left | on /dev/shm")
'''


def write_topic(directory: Path) -> None:
    (directory / "bench_echo.py").write_text(textwrap.dedent(TOPIC))
    (directory / "bench_bad.py").write_text(
        "from benchmarks.harness import workload\n"
        "workload('half', reference=True)(lambda n: n * 1e-6)\n"
        "import shmkit_bench_no_such_module\n")
    (directory / "helpers.py").write_text("raise SystemExit('not a bench module')\n")


def test_discovery_and_markdown(tmp_path):
    write_topic(tmp_path)
    reg = Registry()
    names = discover(tmp_path, reg)
    assert [n.rpartition(".")[2] for n in names] == ["bench_echo"]
    assert list(reg.load_errors) == [str(tmp_path / "bench_bad.py")]
    assert {w.group for w in reg.workloads} == {"echo"}  # nothing left of bench_bad
    md = to_markdown(run(reg, repeat=2, target=0.01), facts={"CPU": "Test CPU 9000"})
    assert "| CPU | Test CPU 9000 |" in md
    assert "## echo\n\n### echo: 1 KiB (µs round trip, lower is better)" in md
    assert "| system | median | min | max | vs reference | n | notes |" in md
    assert "| multiprocessing_pipe (reference) | 10.0 | 10.0 | 10.0 | 1.00× |" in md
    assert "| shmkit.Channel | 2.50 | 2.50 | 2.50 | 0.25× |" in md and "p99_us=7.00" in md
    assert "| faster_fifo | — | — | — | — | — | not installed: shmkit_bench_no_such_module" in md
    assert "error: OSError: no space left \\| on /dev/shm |" in md


def test_cli_quick_run_writes_markdown_and_json(tmp_path, capsys):
    write_topic(tmp_path)
    md, js = tmp_path / "out" / "benchmarks.md", tmp_path / "results.json"
    rc = main(["--dir", str(tmp_path), "--quick", "--markdown", str(md), "--json", str(js)])
    assert rc == 1  # a workload raised and a module failed to import; the rest still ran
    out = capsys.readouterr().out
    assert "shmkit.Channel" in out and "0.25×" in out and "could not import" in out
    text = md.read_text()
    assert text.startswith("# shmkit benchmarks") and "| Python | " in text
    assert "of 2 interleaved repeats" in text and "| shmkit.Channel |" in text
    data = json.loads(js.read_text())
    assert data["settings"]["repeat"] == 2 and data["machine"]["cores"]
    by = {r["system"]: r for r in data["results"]}
    assert by["shmkit.Channel"]["ratio"] == pytest.approx(0.25)
    assert by["faster_fifo"]["status"] == "skipped" and by["broken"]["status"] == "error"

    assert main(["--dir", str(tmp_path), "--list", "--filter", "channel"]) == 1
    out = capsys.readouterr().out
    assert "multiprocessing_pipe (reference)" in out and "shmkit.Channel" in out
    assert "broken" not in out  # filtered out; the reference stays for the ratio
    (tmp_path / "bench_bad.py").unlink()
    assert main(["--dir", str(tmp_path), "--filter", "nothing matches this"]) == 0
