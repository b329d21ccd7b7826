"""The ``shmkit`` command: list, inspect, remove and clean up shared objects.

    shmkit ls                       every shmkit object on this machine
    shmkit info jobs                who holds the lock "jobs", and is it alive?
    shmkit rm 'myapp.*'             remove objects by name or pattern (asks first)
    shmkit gc --dry-run             what crashed processes left behind
    shmkit top                      live activity of every object, every second
    shmkit demo                     the two-process demo
    shmkit bench --filter sync      the benchmarks, from a source checkout

Exit status: 0 success, 1 error (one line on stderr), 2 bad usage.  The work
is done by :mod:`shmkit.inspect`, which programs can call directly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ShmkitError

__all__ = ["main", "build_parser"]

PROG = "shmkit"
# What a command reports as one line and carries on (or exits 1): never a traceback.
_ERRORS = (ShmkitError, OSError, ValueError, LookupError)


# -- help text ----------------------------------------------------------------


def _examples(*pairs: tuple[str, str]) -> str:
    """redis-benchmark style: one sentence of intent, then the exact command."""
    lines = ["Examples:", ""]
    for intent, command in pairs:
        lines += [f" {intent}", f"   $ {command}", ""]
    return "\n".join(lines).rstrip() + "\n"


_TOP_EXAMPLES = _examples(
    ("List every shmkit object, who created it and which processes have it open:",
     "shmkit ls"),
    ("See who holds the lock \"jobs\" and whether that process is still alive:",
     "shmkit info jobs"),
    ("Remove two objects you no longer need (it lists them and asks first):",
     "shmkit rm frames stats"),
    ("See what crashed processes left behind, without removing anything:",
     "shmkit gc --dry-run"),
    ("Watch messages, allocations and lock holders live until Ctrl-C:", "shmkit top"),
    ("Run the demo: senders and a receiver meeting by name:", "shmkit demo"),
    ("Run the lock benchmarks from a source checkout:", "shmkit bench --filter sync"),
)

_COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("list every shmkit object on this machine", _examples(
        ("Show name, kind, size, memory used, creator, attached processes and lifetime "
         "of each object:", "shmkit ls"),
        ("Only the objects whose names start with \"cache\":", "shmkit ls 'cache*'"),
        ("The same facts as JSON, for a script:", "shmkit ls --json"),
    )),
    "info": ("show objects in detail: header, attached processes, lock holder, layout",
             _examples(
                 ("See who holds the mutex \"jobs\", whether it is alive and who waits:",
                  "shmkit info jobs"),
                 ("Show the record layout of the struct \"config\" and the array \"stats\":",
                  "shmkit info config stats"),
                 ("Describe a segment created with path= (any argument with a '/'):",
                  "shmkit info /var/lib/app/frames.shm"),
                 ("Everything as JSON:", "shmkit info --json jobs"),
             )),
    "rm": ("remove objects by name or shell pattern, after listing them and asking "
           "(processes attached keep their memory until they close it); a service "
           "named goes with its request channel",
           _examples(
               ("List the objects \"frames\" and \"stats\", then remove them if you say "
                "yes:", "shmkit rm frames stats"),
               ("Remove every object whose name starts with \"myapp.\", without asking:",
                "shmkit rm --yes 'myapp.*'"),
               ("Remove a segment created with path=:", "shmkit rm -y ./data/frames.shm"),
               ("From a script: remove without asking, report as JSON what was removed:",
                "shmkit rm --yes --json 'cache.*'"),
           )),
    "gc": ("remove what crashed processes left behind (never an object in use; persistent "
           "ones only with --orphans)", _examples(
               ("List what would be removed, removing nothing:", "shmkit gc --dry-run"),
               ("Remove attached-lifetime objects whose processes all died, half-created "
                "objects and stale temp files:", "shmkit gc"),
               ("Only clean up after the workers of one application:",
                "shmkit gc 'myapp.*'"),
               ("Also remove orphans (persistent, nobody attached, creator gone):",
                "shmkit gc --orphans"),
               ("Report what was removed as JSON:", "shmkit gc --json"),
           )),
    "top": ("live activity of every object: messages per second and depth of channels "
            "and queues, keys and bytes of stores, allocations of heaps, workers and "
            "requests served of services, lock holders; "
            "refreshed until Ctrl-C (plain text snapshots when not on a terminal)",
            _examples(
                ("Watch every object, refreshed every second:", "shmkit top"),
                ("Watch only the objects whose names start with \"jobs\", five times a "
                 "second:", "shmkit top --interval 0.2 'jobs*'"),
                ("Print one snapshot (rates measured over half a second) and exit:",
                 "shmkit top --once --interval 0.5"),
                ("One snapshot as JSON, with each object's counters and rates:",
                 "shmkit top --once --json"),
                ("Log a snapshot every ten seconds to a file:",
                 "shmkit top --interval 10 >> shm.log"),
            )),
    "demo": ("run the demo: senders and a receiver meeting by name in shared memory",
             _examples(
                 ("Run the demo with its defaults:", "shmkit demo"),
                 ("Four senders, 100,000 records each:",
                  "shmkit demo --senders 4 --records 100000"),
             )),
    "bench": ("run the benchmarks (python -m benchmarks) from a source checkout; ARGS go to "
              "the benchmarks", _examples(
                  ("Run every benchmark (what `make bench` does, without installing the "
                   "competitors):", "shmkit bench"),
                  ("Only the lock benchmarks, a short smoke run:",
                   "shmkit bench --filter sync --quick"),
                  ("List benchmarks and which competitors are installed:",
                   "shmkit bench --list"),
                  ("Show the benchmarks' own options:", "shmkit bench -- --help"),
              )),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shmkit`` command (``--help`` text included)."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=_TOP_EXAMPLES,
        usage=f"{PROG} [-h] [--version] COMMAND [ARGS...]",
        description="List, inspect, clean up, demonstrate and benchmark shmkit "
                    "shared-memory objects.")
    parser.add_argument("--version", action="version", version=f"shmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    def command(name: str) -> argparse.ArgumentParser:
        purpose, examples = _COMMANDS[name]
        p = sub.add_parser(name, prog=f"{PROG} {name}", help=purpose,
                           description=purpose[0].upper() + purpose[1:] + ".",
                           epilog=examples, formatter_class=fmt)
        p.set_defaults(subparser=p)  # its own usage line for its usage errors
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("ls")
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="only names matching these shell patterns")
    json_flag(p)
    p.set_defaults(func=cmd_ls)

    p = command("info")
    p.add_argument("targets", nargs="+", metavar="NAME",
                   help="object names, or file paths (containing '/') of path= segments")
    json_flag(p)
    p.set_defaults(func=cmd_info)

    p = command("rm")
    p.add_argument("targets", nargs="+", metavar="PATTERN",
                   help="object names, shell patterns of names ('cache.*'), or file paths "
                        "(containing '/') of path= segments")
    p.add_argument("--yes", "-y", action="store_true",
                   help="remove without asking (needed when stdin is not a terminal)")
    json_flag(p)
    p.set_defaults(func=cmd_rm)

    p = command("gc")
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="only objects whose names match these shell patterns")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="say what would be removed, remove nothing")
    p.add_argument("--orphans", action="store_true",
                   help="also remove persistent objects nobody is attached to whose "
                        "creator is gone (listed, not removed, without this flag)")
    json_flag(p)
    p.set_defaults(func=cmd_gc)

    p = command("top")
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="only objects whose names match these shell patterns")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot (rates measured over one interval) and exit")
    p.add_argument("--json", action="store_true",
                   help="print JSON (one line per snapshot) instead of a table")
    p.set_defaults(func=cmd_top)

    p = command("demo")
    p.add_argument("--senders", type=_count, metavar="N",
                   help="sender processes (default: the demo's own)")
    p.add_argument("--records", type=_count, metavar="N",
                   help="records each sender sends (default: the demo's own)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_demo)

    p = command("bench")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="passed to `python -m benchmarks` (see `shmkit bench -- --help`)")
    p.set_defaults(func=cmd_bench)

    # bridge: a local Channel or Queue to and from a Redis stream (needs shmkit[redis]
    # only when it runs); declared and run by src/shmkit/redis/bridge.py
    from .redis.bridge import add_bridge_command
    add_bridge_command(sub, fmt)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


# -- output helpers -----------------------------------------------------------


# Names, states, field names and process names come from files another
# user may have written, so what a terminal acts on, and what would hide or
# disguise text, is shown as an escape: C0 and C1 controls and DEL (ESC
# sequences set titles, clear, move the cursor; a line end would start a
# row of its own), format characters (bidi overrides and isolates,
# zero-width ones, tags), line and paragraph separators, private-use and
# unassigned code points, the Hangul fillers that print as blanks, bytes of
# a file name that are not UTF-8 (as os.listdir's surrogates), and the
# backslash itself, so that no name can imitate an escape.
_HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs"))
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")


def _shown(text: str) -> str:
    """``text`` with its control and invisible characters escaped, for a terminal.

    >>> _shown("a\\x1b[2J\\u202eb\\udcff\\\\")
    'a\\\\x1b[2J\\\\u202eb\\\\xff\\\\\\\\'
    """
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_shown_char, text))


def _shown_char(c: str) -> str:
    n = ord(c)
    if c == "\\":
        return "\\\\"
    if n < 0x20 or n == 0x7F:
        return f"\\x{n:02x}"
    if 0x80 <= n < 0xA0:  # C1 controls: \u, so that none looks like a byte that is not UTF-8
        return f"\\u{n:04x}"
    if 0xDC80 <= n <= 0xDCFF:  # a byte that is not UTF-8, as os.listdir gives it
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x7F:
        return c
    if unicodedata.category(c) in _HIDDEN_CATEGORIES or c in _FILLERS:
        return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"
    return c


def _text(text: str, style: str = "") -> Any:
    """A table cell of ``text``, its control characters escaped."""
    from rich.text import Text

    return Text(_shown(text), style=style)


def _console() -> Any:
    """A rich console for stdout: colours on a terminal, no markup or emoji codes in
    names (``a:smile:`` is a valid name), 160 columns when piped."""
    from rich.console import Console

    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(highlight=False, markup=False, emoji=False,
                   width=None if wide else 160)


def _error(command: str | None, message: str) -> None:
    where = f"{PROG} {command}" if command else PROG
    # one line: a line end or a space at the end of a name is shown as it is
    # (a line end escaped, as \x0a), neither joined nor stripped
    print(f"{where}: {_shown(str(message))}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _bytes(size: int | None) -> str:
    if size is None:
        return "?"
    n: float = size
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit}"
    return f"{seconds / 86400:.0f} days"


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    stamp = datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({_age(time.time() - ts)} ago)"


def _state_style(state: str) -> str:
    if state == "ok":
        return "green"
    if state in ("stale", "creating"):
        return "yellow"
    return "red"


def _pids(obj: dict[str, Any], limit: int = 6) -> str:
    pids = sorted({a["pid"] for a in obj["attached"]})
    text = ", ".join(map(str, pids[:limit]))
    if len(pids) > limit:
        text += f", … ({len(pids)})"
    if obj.get("readonly_attached"):
        text = (text + " + read-only") if text else "read-only"
    return text or "-"


#: Kinds whose payload can grow after creation (``Segment.resize``, a store
#: growing by itself, a heap made with room): only they show "grows to".
_GROWABLE = frozenset({"raw", "store", "heap"})


def _grows_to(obj: dict[str, Any]) -> int | None:
    """The payload size an object may grow to, as its header says, or None."""
    size, top = obj.get("size"), obj.get("max_size")
    if obj.get("kind") in _GROWABLE and size is not None and top is not None and top > size:
        return int(top)
    return None


def _objects_table(objects: list[dict[str, Any]], activity: bool = False,
                   title: str | None = None) -> Any:
    """The ``ls`` table; with ``activity`` (``top``), each object's ``activity`` text
    in place of its creator and lifetime."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    # (a name is never squeezed out: a long state folds within its width)
    longest = max((len(o["name"]) for o in objects), default=4)
    table.add_column("NAME", overflow="fold", min_width=min(longest, 24))
    table.add_column("KIND", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("MEMORY", justify="right", no_wrap=True)
    if not activity:
        table.add_column("CREATOR", justify="right", no_wrap=True)
    table.add_column("ATTACHED", overflow="fold")
    if activity:
        table.add_column("ACTIVITY", overflow="fold", ratio=1)
    else:
        table.add_column("LIFETIME", overflow="fold")
    table.add_column("STATE", overflow="fold", max_width=40)
    total = 0
    for obj in objects:
        size = obj["size"]
        total += obj["file_bytes"] or 0
        row = [_text(obj["name"], "bold"), _text(obj["kind"] or "?"),
               Text(_bytes(size) if size is not None else "?"),
               Text(_bytes(obj["file_bytes"]))]
        if not activity:
            row.append(Text(str(obj["creator_pid"] or "?")))
        row.append(Text(_pids(obj)))
        row.append(_text(obj.get("activity", "")) if activity
                   else _text(obj["lifetime"] or "?"))
        row.append(_text(obj["state"], _state_style(obj["state"])))
        table.add_row(*row)
    n = len(objects)
    table.caption = f"{n} object{'s' if n != 1 else ''}, {_bytes(total)} of memory"
    table.caption_justify = "left"
    return table


# -- commands -----------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    from .inspect import list_objects

    objects = list_objects(args.patterns)
    if args.json:
        _print_json(objects)
        return 0
    console = _console()
    if not objects:
        console.print("no shmkit objects" + (" match" if args.patterns else ""), style="dim")
        return 0
    console.print(_objects_table(objects))
    return 0


def _lock_text(lock: dict[str, Any]) -> str:
    waiters = ", processes may be waiting" if lock.get("waiters") else ""
    if not lock.get("held"):
        return "free" + waiters
    pid = lock.get("holder_pid")
    who = f"pid {pid}" if pid else "an attachment since replaced"
    if lock.get("holder_stopped"):
        return f"held by {who}, which is STOPPED (SIGSTOP or a debugger): it blocks " \
               f"everyone waiting until it continues{waiters}"
    if lock.get("holder_alive"):
        return f"held by {who} (alive){waiters}"
    return f"held by {who}, which is dead: the next acquirer recovers it{waiters}"


def _counts_text(items: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"pid {i['pid']} × {i[key]}" for i in items) or "none"


_STANDARD = {"name", "path", "state", "kind", "size", "max_size", "file_bytes",
             "format_version", "lifetime", "created", "creator_pid", "max_attach",
             "attached", "readonly_attached", "resizes", "layout", "uid", "mode", "lock",
             "detail_error"}


def _kind_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if "mutex" in info:
        rows.append(("mutex", _lock_text(info["mutex"])))
    if "condition" in info:
        c = info["condition"]
        rows += [("condition lock", _lock_text(c["lock"])), ("waiting", str(c["waiters"]))]
    if "event" in info:
        e = info["event"]
        rows += [("event", ("set" if e["set"] else "clear")
                  + (" (auto-reset)" if e.get("auto_reset") else "")),
                 ("waiting", str(e["waiters"]))]
    if "rwlock" in info:
        r = info["rwlock"]
        rows += [("writer", _lock_text(r["writer"])),
                 ("readers", _counts_text(r["readers"], "holds"))]
        if r["dead_reader_holds"]:
            rows.append(("dead readers", f"{r['dead_reader_holds']} holds (dropped by the "
                                         "next writer)"))
        if r["writer_waiting_or_in"] and not r["writer"]["held"]:
            rows.append(("writer waiting", "yes"))
    if "semaphore" in info:
        s = info["semaphore"]
        value = f"{s['value']}" + (f" of at most {s['maximum']}" if s["maximum"] is not None
                                   else "")
        rows += [("value", value), ("waiting", str(s["waiters"])),
                 ("holders", _counts_text(s["holders"], "units"))]
        if s["dead_units"]:
            rows.append(("dead holders", f"{s['dead_units']} units (returned when someone "
                                         "waits)"))
    for key in ("record", "array"):
        if key in info:
            d = info[key]
            fields = d.get("fields", [])
            text = f"{len(fields)} fields" if fields else d["dtype"]
            if "shape" in d:
                text += f", shape {tuple(d['shape'])}"
            if "itemsize" in d:
                text += f", {d['itemsize']} bytes"
            rows.append((key, text))
            for f in d.get("fields", []):
                rows.append((f"  .{f['name']}", f"{f['dtype']} at offset {f['offset']}"))
    handled = _STANDARD | {"mutex", "condition", "event", "rwlock", "semaphore",
                           "record", "array"}
    for key, value in info.items():  # channels, stores, heaps: whatever info() reports
        if key not in handled:
            rows += _flatten(key, value)
    if info.get("kind") not in ("struct", "array") and info.get("layout"):
        rows.append(("layout", json.dumps(info["layout"], separators=(", ", ": "))))
    return rows


def _flatten(key: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        if {"held", "holder_pid", "holder_alive"} <= value.keys():
            return [(key, _lock_text(value))]
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _flatten(f"{key}.{k}", v)
        return out
    if isinstance(value, float):
        return [(key, f"{value:g}")]
    if isinstance(value, (list, tuple)):
        return [(key, json.dumps(value, default=str))]
    return [(key, str(value))]


def _info_table(info: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = info["state"]
    title = Text.assemble((_shown(info["name"]), "bold"), "  ",
                          (_shown(info["kind"] or "?"), "cyan"), "  ",
                          (_shown(state), _state_style(state)))
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 1))
    table.add_column(style="dim", max_width=40, overflow="fold")  # a field's name may be long
    table.add_column(overflow="fold", min_width=24)
    rows: list[tuple[str, Any]] = [("path", info["path"])]
    if state == "half-created":
        rows.append(("state", "its creator died before finishing it; `shmkit gc` or "
                              f"`shmkit rm {info['name']}` removes it"))
    elif state.startswith(("corrupt", "format")):
        rows.append(("state", f"{state}; remove it with `shmkit rm {info['name']}` if it "
                              "is garbage"))
    elif state == "stale":
        rows.append(("state", "lifetime 'attached' and every attached process is gone; "
                              "`shmkit gc` removes it"))
    if info["size"] is not None:
        rows.append(("size", f"{_bytes(info['size'])} ({info['size']:,} bytes)"))
        grows = _grows_to(info)
        if grows is not None:
            rows.append(("grows to", f"{_bytes(grows)} (reserved address space, used "
                                     "only as it grows)"))
    if info["file_bytes"] is not None:
        rows.append(("memory", f"{_bytes(info['file_bytes'])} (header, attach table and "
                               "the payload pages in use)"))
    if info["lifetime"]:
        rows.append(("lifetime", info["lifetime"]))
    if info["created"] is not None:
        rows.append(("created", f"{_when(info['created'])} by pid {info['creator_pid']}"))
    if info["format_version"] is not None:
        rows.append(("format", f"version {info['format_version']}"))
    if info["mode"] is not None:
        rows.append(("owner", f"uid {info['uid']}, mode {info['mode']:04o}"))
    if info["max_attach"] is not None:
        attached = info["attached"]
        rows.append(("attached", f"{len(attached)} of {info['max_attach']} slots"
                                 + (", and read-only handles" if info["readonly_attached"]
                                    else "")))
        for a in attached:
            rows.append(("", f"pid {a['pid']} ({a['comm']}) since {_when(a['attached'])}"))
    if info.get("resizes"):
        rows.append(("resizes", str(info["resizes"])))
    if "lock" in info:
        rows.append(("segment lock", _lock_text(info["lock"])))
    rows += _kind_rows(info)
    if info.get("detail_error"):
        rows.append(("detail", _text(f"unavailable: {info['detail_error']}", "red")))
    for k, v in rows:
        table.add_row(_text(k), v if isinstance(v, Text) else _text(str(v)))
    return Group(title, table)


def cmd_info(args: argparse.Namespace) -> int:
    from .inspect import describe

    results, failed = [], False
    console = None if args.json else _console()
    for target in args.targets:
        try:
            info = describe(target)
        except _ERRORS as e:
            _error("info", _message(e))
            failed = True
            continue
        if console is None:
            results.append(info)
        else:
            console.print(_info_table(info))
            console.print()
    if args.json:
        _print_json(results)
    return 1 if failed else 0


def _rm_table(objects: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("NAME", "left"), ("KIND", "left"), ("SIZE", "right"),
                            ("ATTACHED", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for obj in objects:
        table.add_row(_text(obj["name"], "bold"),
                      _text(obj["kind"] or obj["state"]),
                      Text(_bytes(obj["size"]) if obj["size"] is not None
                           else _bytes(obj["file_bytes"])),
                      Text(_pids(obj)))
    return table


def _ask(question: str) -> bool:
    """Ask on the terminal; True only for an explicit yes."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def cmd_rm(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .inspect import remove, select

    objects, problems = select(args.targets)
    objects = _with_service_parts(objects)
    for _target, message in problems:
        _error("rm", message)
    results: list[dict[str, Any]] = [{"name": t, "removed": False, "error": m}
                                     for t, m in problems]
    failed = bool(problems)
    if objects and not args.yes:
        if not sys.stdin.isatty():
            names = ", ".join(o["name"] for o in objects[:5])
            more = f" and {len(objects) - 5} more" if len(objects) > 5 else ""
            _error("rm", f"not removing {_plural(len(objects), 'object')} ({names}{more}) "
                         "without confirmation: stdin is not a terminal; pass --yes (-y) "
                         "to remove them")
            if args.json:
                _print_json(results)
            return 1
        # The list and the question go to stderr with --json: stdout stays JSON.
        shown = Console(stderr=True, highlight=False, markup=False, emoji=False) \
            if args.json else _console()
        shown.print(_rm_table(objects))
        question = "Remove it? [y/N] " if len(objects) == 1 else \
            f"Remove these {len(objects)} objects? [y/N] "
        if not _ask(question):
            shown.print("nothing removed")
            if args.json:
                _print_json(results)
            return 1 if failed else 0
    console = None if args.json else _console()
    not_removed: set[str] = set()
    for obj in objects:
        service = obj.get("part_of")
        if service in not_removed:  # a service's channel stays with the service
            _error("rm", f"not removing {obj['name']}: its service {service} was not removed")
            results.append({"name": obj["name"], "removed": False,
                            "error": f"its service {service} was not removed"})
            continue
        try:
            facts = remove(obj["name"])
        except _ERRORS as e:
            _error("rm", f"could not remove {obj['name']}: {_message(e)}")
            results.append({"name": obj["name"], "removed": False, "error": _message(e)})
            failed = True
            not_removed.add(obj["name"])
            continue
        pids = sorted({a["pid"] for a in facts["attached"]})
        results.append({"name": facts["name"], "path": facts["path"], "kind": facts["kind"],
                        "size": facts["size"], "removed": True, "still_attached": pids,
                        "readonly_attached": facts["readonly_attached"]})
        if console is not None:
            console.print(_text(f"removed {facts['name']}"))
        if pids or facts["readonly_attached"]:
            who = f"pid {', '.join(map(str, pids))}" if pids else ""
            if facts["readonly_attached"]:
                who = (who + " and " if who else "") + "read-only handles"
            _error("rm", f"warning: {facts['name']} is still mapped by {who}: they keep "
                         "their memory until they close it")
    if args.json:
        _print_json(results)
    return 1 if failed else 0


def _with_service_parts(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects picked, and the request channel (NAME.requests) of each
    service picked by name, unless picked already: a service goes with it,
    and the list the question shows names it.  (Reply channels stay: each
    client's, removed by its close, or by ``shmkit gc`` once it is gone.)"""
    from .inspect import scan

    picked = {o["path"] for o in objects}
    out = list(objects)
    for obj in objects:
        if obj.get("kind") != "service" or "/" in obj["name"]:
            continue
        try:
            facts = scan(f"{obj['name']}.requests")
        except _ERRORS:
            continue  # gone, or never made
        if facts.get("kind") == "channel" and facts["path"] not in picked:
            out.append(dict(facts, part_of=obj["name"]))
            picked.add(facts["path"])
    return out


def cmd_gc(args: argparse.Namespace) -> int:
    from .inspect import collect_garbage, find_orphans

    results = collect_garbage(dry_run=args.dry_run, patterns=args.patterns,
                              orphans=args.orphans)
    errors = [r for r in results if r.get("error")]
    for r in errors:
        _error("gc", f"could not remove {r['name']}: {r['error']}")  # (_error escapes)
    if args.json:
        _print_json(results)
        return 1 if errors else 0
    console = _console()
    done = [r for r in results if not r.get("error")]
    if not done:
        console.print("nothing to remove", style="dim")
    verb = "would remove" if args.dry_run else "removed"
    for r in done:
        console.print(_text(f"{verb} {r['name']}: {r['reason']}"))
    if not args.orphans:
        for o in find_orphans(args.patterns):
            console.print(_text(f"orphan {o['name']}: {o['kind']}, {o['size']} bytes, created "
                          f"{o['age']:.0f} s ago by pid {o['creator_pid']} (gone), nobody "
                          "attached; `shmkit gc --orphans` removes it", "yellow"))
    return 1 if errors else 0


def _top_objects(patterns: Sequence[str], previous: list[dict[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    """One sample of every object, with rates against ``previous`` (same objects)."""
    from .inspect import activity, rates, sample

    before = {o["path"]: o for o in previous or []}
    objects = sample(patterns)
    for obj in objects:
        earlier = before.get(obj["path"])
        obj["rates"] = rates(earlier, obj) if earlier is not None else {}
        obj["activity"] = activity(obj, obj["rates"])
    return objects


def _top_frame(objects: list[dict[str, Any]], interval: float, live: bool) -> Any:
    from rich.console import Group
    from rich.text import Text

    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    head = Text.assemble(("shmkit top", "bold"), f"  {stamp}  rates over {interval:g} s",
                         ("  Ctrl-C to quit", "dim") if live else "")
    if not objects:
        return Group(head, Text("no shmkit objects", style="dim"))
    return Group(head, _objects_table(objects, activity=True))


def _top_json(objects: list[dict[str, Any]], interval: float) -> dict[str, Any]:
    return {"time": time.time(), "interval": interval,
            "objects": [{k: v for k, v in o.items() if k != "sampled"} for o in objects]}


def cmd_top(args: argparse.Namespace) -> int:
    """Sample, wait an interval, sample again: each frame shows the rates between."""
    console = _console()
    live = console.is_terminal and not args.json and not args.once
    try:
        previous = _top_objects(args.patterns, None)
        if live:
            from rich.live import Live

            with Live(_top_frame(previous, args.interval, True), console=console,
                      auto_refresh=False, screen=False, redirect_stdout=False) as screen:
                while True:
                    time.sleep(args.interval)
                    previous = _top_objects(args.patterns, previous)
                    screen.update(_top_frame(previous, args.interval, True), refresh=True)
        while True:  # not a terminal (or --once, --json): a plain snapshot per interval
            time.sleep(args.interval)
            previous = _top_objects(args.patterns, previous)
            if args.json:
                text = json.dumps(_top_json(previous, args.interval), default=str,
                                  indent=2 if args.once else None)
                print(text, flush=True)
            else:
                console.print(_top_frame(previous, args.interval, False))
                if not args.once:
                    console.print()
                console.file.flush()
            if args.once:
                return 0
    except KeyboardInterrupt:
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    try:
        demo = importlib.import_module("shmkit.demo")
    except ModuleNotFoundError as e:
        if e.name == "shmkit.demo":
            _error("demo", "the demo is not part of this installation of shmkit "
                           "(module shmkit.demo is missing); install a release of shmkit "
                           "that includes it")
        else:
            _error("demo", f"the demo needs {e.name!r}, which is not installed: {e}")
        return 1
    except ImportError as e:
        _error("demo", f"the demo cannot start: {e}")
        return 1
    options: dict[str, Any] = {"quiet": args.quiet}
    if args.senders is not None:
        options["senders"] = args.senders
    if args.records is not None:
        options["records"] = args.records
    result = demo.run(**options)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _checkout() -> Path | None:
    """The source checkout holding ``benchmarks/``: the package's, else the cwd."""
    here = Path(__file__).resolve().parent  # .../src/shmkit
    for root in (here.parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    root = _checkout()
    if root is None:
        _error("bench", "the benchmarks are not installed with the package; they live in "
                        "the benchmarks/ directory of a source checkout: clone shmkit and "
                        "run `make bench` there (or `shmkit bench` from its root)")
        return 1
    env = dict(os.environ)
    paths = [str(root), str(root / "src")] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", *extra], cwd=root, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the benchmarks got the Ctrl-C too: let them stop
        try:
            return proc.wait(timeout=10) or 130
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
            return 130


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, ShmkitError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e)
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shmkit`` command with ``argv`` (default ``sys.argv[1:]``); returns the
    exit status: 0 success, 1 error, 2 usage.

    >>> main(["ls", "--json"])          # doctest: +SKIP
    []
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"] and argv[1:] not in (["-h"], ["--help"]):
        args = argparse.Namespace(command="bench", args=argv[1:], func=cmd_bench)
    else:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would report these with the top-level usage line
            args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shmkit ls | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except (*_ERRORS, RuntimeError) as e:
        _error(args.command, _message(e))
        return 1
    except Exception as e:
        if os.environ.get("SHMKIT_DEBUG"):
            raise
        _error(args.command, f"internal error: {type(e).__name__}: {_message(e)} "
                             "(run with SHMKIT_DEBUG=1 for the traceback, and please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
