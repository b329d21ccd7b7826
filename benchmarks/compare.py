"""Compare shmkit's own figures at two commits, measured in one sitting.

    python -m benchmarks.compare HEAD~1                 # the working tree against HEAD~1
    python -m benchmarks.compare v0.1 --rounds 3 --filter channel

The older commit is checked out into a temporary git worktree and its C core
built there. Then the benchmark runner (of this tree, so both sides run the
same workloads) is started alternately against each side's ``src/`` --
base, head, base, head, ... -- so that machine noise falls on both alike. For
every shmkit system the median of the per-round medians is compared, and a
row is marked when the head is more than ``--threshold`` (default 5%) slower.
A workload that exists only at the head is listed as new.

Exit status: 0, or 1 when some shmkit figure is slower than the threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import UNITS

ROOT = Path(__file__).resolve().parent.parent


def higher_is_better(unit: str) -> bool:
    """Rates and bandwidths grow with speed; times shrink.

    >>> higher_is_better("GB/s"), higher_is_better("ns/op")
    (True, False)
    """
    return UNITS[unit][0] != "time"


def checkout(rev: str, where: Path) -> Path:
    """A built worktree of ``rev`` at ``where``."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev],
                   check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where,
                   check=True, stdout=subprocess.DEVNULL)
    return where


def one_round(src: Path, out: Path, args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Run the benchmarks once against ``src``; {(benchmark, system): result}."""
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "benchmarks", "--json", str(out), "--repeat", str(args.repeat),
           "--filter", args.filter]
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
    if not out.exists():
        return {}
    data = json.loads(out.read_text())
    return {(r["benchmark"], r["system"]): r for r in data["results"]
            if r["status"] == "ok" and r["system"].startswith("shmkit")}


def compare(rounds: list[tuple[dict, dict]], threshold: float) -> list[dict]:
    """One row per shmkit figure: base and head medians and the head's speed ratio."""
    keys = {k for _, head in rounds for k in head}
    rows = []
    for key in sorted(keys):
        base = [b[key]["median"] for b, _ in rounds if key in b]
        head = [h[key]["median"] for _, h in rounds if key in h]
        unit = next(h[key]["unit"] for _, h in rounds if key in h)
        row = {"benchmark": key[0], "system": key[1], "unit": unit,
               "base": statistics.median(base) if base else None,
               "head": statistics.median(head), "speed": None, "slower": False}
        if row["base"]:
            # speed > 1: the head is faster, whatever the unit's direction
            up = higher_is_better(unit)
            row["speed"] = row["head"] / row["base"] if up else row["base"] / row["head"]
            row["slower"] = row["speed"] < 1.0 - threshold
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], rev: str, threshold: float) -> str:
    lines = [f"| benchmark | system | unit | {rev} | head | head speed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = f"{r['base']:.4g}" if r["base"] else "new"
        speed = f"{r['speed']:.2f}x" if r["speed"] else ""
        if r["slower"]:
            speed += f" (more than {threshold:.0%} slower)"
        lines.append(f"| {r['benchmark']} | {r['system']} | {r['unit']} | {base} | "
                     f"{r['head']:.4g} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the commit to compare against (e.g. HEAD~1, main)")
    p.add_argument("--rounds", type=int, default=3, help="alternate runs per side (default 3)")
    p.add_argument("--repeat", type=int, default=3, help="repeats per system in each run")
    p.add_argument("--filter", default="shmkit", metavar="SUBSTR",
                   help="benchmarks to run, as for python -m benchmarks (default: shmkit's)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="mark figures slower than this fraction (default 0.05)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1 or not 0 < args.threshold < 1:
        p.error("--rounds and --repeat must be positive, --threshold between 0 and 1")

    with tempfile.TemporaryDirectory(prefix="shmkit-compare-") as tmp:
        base_tree = Path(tmp) / "base"
        try:  # the worktree is removed even when its build fails or Ctrl-C stops it
            checkout(args.rev, base_tree)
            rounds = []
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}: {args.rev}", flush=True)
                base = one_round(base_tree / "src", Path(tmp) / f"base{i}.json", args)
                print(f"round {i + 1}/{args.rounds}: head", flush=True)
                head = one_round(ROOT / "src", Path(tmp) / f"head{i}.json", args)
                rounds.append((base, head))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base_tree)], check=False, stderr=subprocess.DEVNULL)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    rows = compare(rounds, args.threshold)
    table = to_markdown(rows, args.rev, args.threshold)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 1 if any(r["slower"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
