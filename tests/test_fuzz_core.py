"""The C core's checks against a damaged mapping, re-bound in place (tests/fuzz_core.py).

The bounded runs are part of ``make test``; the long run is ``-m stress`` with
``SHMKIT_CORE_FUZZ_CASES`` cases per kind (default a million), which
``make stress`` runs under AddressSanitizer (see docs/testing.md).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_core  # noqa: E402

BOUNDED = 10_000  # cases per kind in make test: about a second each


def _check(name: str, kind: str, seed: int, cases: int, timeout: float,
           first: int = 0) -> None:
    t0 = time.monotonic()
    rc, out = fuzz_core.run_child(kind, name, seed, cases, timeout, first)
    tail = out[-5000:]
    assert rc >= 0, f"{kind} seed {seed}: child died by signal {-rc}:\n{tail}"
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, tail
    assert rc == 0, tail
    assert f"done {kind}: {cases} cases, 0 with unexpected errors" in out, tail
    done = [line for line in out.splitlines() if line.startswith("done ")]
    # most damage leaves the object usable: a run whose binds all fail (its
    # object unusable from the first case) would test nothing
    bound = int(done[-1].split(" with unexpected errors, ")[1].split()[0])
    assert cases < 100 or bound >= cases // 4, done[-1]
    print(f"{done[-1]} seed {seed}, {time.monotonic() - t0:.1f} s with start-up")


@pytest.mark.parametrize("kind", fuzz_core.KINDS)
def test_damaged_core_never_crashes_hangs_or_raises_a_stray_error(name, kind):
    _check(name, kind, 1, BOUNDED, timeout=300)


# Cases the core fuzzer once failed, replayed exactly: (kind, seed, case).
FOUND = [
    # a dead holder's damaged count of 2**31 - 1 units, given back by the
    # reclaim of an acquire, raised the value to the limit: releasing the units
    # this process had acquired raised the caller's ValueError ("released
    # beyond 2**31 - 1 units"), now CorruptError
    ("semaphore", 1, 1728),
    ("semaphore", 2, 317),
]


@pytest.mark.parametrize("kind,seed,case", FOUND)
def test_core_fuzz_findings_stay_fixed(name, kind, seed, case):
    _check(name, kind, seed, 1, timeout=60, first=case)


@pytest.mark.stress
@pytest.mark.parametrize("kind", fuzz_core.KINDS)
def test_damaged_core_fuzz_long(name, kind):
    cases = int(os.environ.get("SHMKIT_CORE_FUZZ_CASES", "1000000"))
    seed = int(os.environ.get("SHMKIT_CORE_FUZZ_SEED", "100"))
    _check(name, kind, seed, cases, timeout=max(600.0, cases * 0.005))
