"""The log sender/receiver demo: ``shmkit demo``, ``make demo``, ``python -m shmkit.demo``.

One receiver and several senders, each a separate program
(``examples/log_receiver.py``, ``examples/log_sender.py``), meet by the
name of a :class:`shmkit.Channel` and pass structured log records through
it.  Each sender logs 20,000 records a second.  The receiver prints the errors as they arrive under a
progress bar, then a summary: records, records per second, latency
percentiles, and whether every sender's records arrived once and in order.

>>> from shmkit import demo
>>> demo.run(senders=2, records=1000, quiet=True)  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .channel import Channel

__all__ = ["run", "example_path"]

CAPACITY = 8 << 20
RATE = 20000  # records per second per sender: a busy service, below what one receiver takes
_TIMEOUT = 60.0


def example_path(script: str) -> Path:
    """Where the example program ``script`` is: the source tree's ``examples/``,
    or the copy installed under ``<prefix>/share/shmkit/examples``."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "examples" / script,
                  Path(sysconfig.get_path("data")) / "share" / "shmkit" / "examples" / script,
                  Path(sys.prefix) / "share" / "shmkit" / "examples" / script]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"cannot find the example program {script!r}; looked in "
                            + ", ".join(str(c.parent) for c in candidates))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[1])  # so the programs import this shmkit
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(senders: int = 4, records: int = 20000, quiet: bool = False) -> int:
    """Run one receiver and ``senders`` senders of ``records`` records each.

    Returns the receiver's exit status: 0 when every record arrived, once
    and in order.  The channel is made under a unique name and removed at
    the end.
    """
    if senders < 1 or records < 0:
        raise ValueError("need senders >= 1 and records >= 0")
    name = f"demo-logs-{os.getpid()}-{secrets.token_hex(3)}"
    env = _env()
    ch = Channel(name, capacity=CAPACITY)
    procs: list[subprocess.Popen[bytes]] = []
    listening = False
    try:
        cmd = [sys.executable, str(example_path("log_receiver.py")), "--name", name,
               "--senders", str(senders), "--expect", str(senders * records)]
        # Each program in a session of its own: a terminal's Ctrl-C reaches
        # this one alone, which hands it on to a receiver that listens (it
        # prints what came) and stops the rest, whatever they were doing
        # (importing, say, where a Ctrl-C would print a traceback).
        receiver = subprocess.Popen(cmd + (["--quiet"] if quiet else []), env=env,
                                    start_new_session=True)
        procs.append(receiver)
        ready_by = time.monotonic() + 15  # senders start once the receiver listens
        while (ch.statistics()["consumers"] == 0 and receiver.poll() is None
               and time.monotonic() < ready_by):
            time.sleep(0.01)
        listening = ch.statistics()["consumers"] > 0
        for i in range(senders):
            procs.append(subprocess.Popen(
                [sys.executable, str(example_path("log_sender.py")), "--name", name,
                 "--id", str(i), "--records", str(records), "--rate", str(RATE)], env=env,
                start_new_session=True))
        deadline = time.monotonic() + _TIMEOUT
        failed = 0
        for p in procs[1:]:
            failed |= p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0
        if failed:  # a sender gave up: let the receiver finish with what came
            ch.close_sending()
        status = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))
        return status or int(failed)
    except subprocess.TimeoutExpired:
        print(f"shmkit demo: still running after {_TIMEOUT:.0f} s; stopping it",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if listening and receiver.poll() is None:
            receiver.send_signal(signal.SIGINT)
            try:
                receiver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            ch.unlink()
        except Exception:
            pass
        ch.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmkit.demo",
                                     description="Run the log sender/receiver demo.")
    parser.add_argument("--senders", type=int, default=4, help="sender programs (default 4)")
    parser.add_argument("--records", type=int, default=20000,
                        help="records per sender (default 20000)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    return run(args.senders, args.records, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
