"""Two machines joined by Redis, simulated on this one: each keeps its shared memory.

Machine A's programs send jobs into the local channel ``a.jobs`` and
publish prices on the local topic ``a.prices``; machine B's programs receive
them from ``b.jobs`` and ``b.prices``.  Between them run four
``shmkit bridge`` processes (two per "machine") and one Redis server: the
only traffic that crosses is the bridges'.  On two real machines the names
would be the same on both (``jobs``, ``prices``) and the URL the Redis
server's; here the ``a.``/``b.`` prefixes keep the two "machines" apart.

    python examples/two_machines.py [messages]

Needs redis-server (Debian: apt-get install redis-server) and shmkit[redis].
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import shmkit


def start_redis(where: str) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("this example needs redis-server (apt-get install redis-server)")
    sock = os.path.join(where, "redis.sock")
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no", "--dir", where],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.01)
    return proc, f"unix://{sock}"


def bridge(url: str, direction: str, local: str, remote: str, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "shmkit", "bridge", f"--{direction}", url,
                          "--remote", remote, *extra, local],
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    print(p.stderr.readline().strip())  # "shmkit bridge: local ... (Ctrl-C stops)"
    return p


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    where = tempfile.mkdtemp(prefix="shmkit-two-machines-")
    redis_proc, url = start_redis(where)
    names = ["a.jobs", "b.jobs", "a.prices", "b.prices"]
    a_jobs, b_jobs = shmkit.Channel("a.jobs"), shmkit.Channel("b.jobs")
    a_prices, b_prices = shmkit.Topic("a.prices"), shmkit.Topic("b.prices")
    watcher = b_prices.subscribe()  # a program on B that watches prices
    bridges = [bridge(url, "to", "a.jobs", "jobs", "--batch", "64"),
               bridge(url, "from", "b.jobs", "jobs"),
               bridge(url, "to", "a.prices", "prices", "--topic"),
               bridge(url, "from", "b.prices", "prices", "--topic")]
    try:
        while not a_prices.statistics()["subscribers"]:  # A's topic bridge subscribed
            time.sleep(0.01)
        time.sleep(0.5)  # B's topic bridge records where it starts
        t0 = time.monotonic()
        for i in range(n):  # programs on A
            a_jobs.send(b"job %d" % i)
            a_prices.publish(b"price %d" % i)
        jobs = [b_jobs.recv(timeout=60) for _ in range(n)]  # programs on B
        prices = [watcher.recv(timeout=60) for _ in range(n)]
        dt = time.monotonic() - t0
        assert jobs == [b"job %d" % i for i in range(n)]
        assert prices == [b"price %d" % i for i in range(n)]
        print(f"{n:,} jobs and {n:,} prices crossed from A to B through Redis in "
              f"{dt:.2f} s ({2 * n / dt:,.0f} messages/s), every one once, in order")
    finally:
        for p in bridges:
            p.terminate()
            p.wait(30)
        watcher.close()
        for obj in (a_jobs, b_jobs, a_prices, b_prices):
            obj.close()
        for name in names:
            shmkit.unlink(name)
        redis_proc.terminate()
        redis_proc.wait(30)
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
