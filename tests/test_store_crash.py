"""shmkit.Store killed at every crash point of every mutating operation.

For each operation a forked child opens the store, arms
``_core.fault(k, "table.")`` and runs the operation, so it SIGKILLs itself
at the k-th ``table.*`` crash point (crash.c); k = 1, 2, ... until the child
completes.  After each kill the parent opens the store, runs ``verify()``
(its lock finds the dead holder and repairs) and checks the old-or-new
rule: the keys hold exactly the state before the operation or exactly the
state after it, never anything else, and ``len()`` matches.
"""

from __future__ import annotations

import os

import pytest

from shmkit import Store, _core

SMALL = 16 << 10


def _pad(i: int, n: int = 100) -> bytes:
    return bytes([i & 255]) * n


def setup_plain(st: Store) -> None:
    for i in range(20):
        st[i] = _pad(i)


def setup_pending(st: Store) -> None:
    # more than 256 KiB pending and more than 1/8 of the heap: the next put
    # recycles first
    setup_plain(st)
    for i in range(100, 400):
        st[i] = _pad(i, 1200)
    for i in range(100, 400):
        del st[i]  # a delete never recycles


def setup_index_full(st: Store) -> None:
    # 48 keys in the first index of 64 words: the next insert builds a new one
    for i in range(48):
        st[i] = i


def setup_holes(st: Store) -> None:
    for i in range(60):
        st[i] = _pad(i, 300)
    for i in range(0, 60, 2):
        del st[i]


def op_insert(st: Store) -> None:
    st["new"] = "value"


def op_update(st: Store) -> None:
    st[5] = "updated"


def op_delete(st: Store) -> None:
    del st[5]


def op_batch(st: Store) -> None:
    with st.batch():
        st[1] = "one"
        st["fresh"] = b"fresh"
        del st[2]
        st[3] = 3.5


def op_grow(st: Store) -> None:
    st["big"] = b"g" * (64 << 10)  # more than the free space: the segment grows


def op_vacuum(st: Store) -> None:
    st.vacuum()


def op_clear(st: Store) -> None:
    st.clear()


CASES = {
    "insert": (setup_plain, op_insert, ["table.put."]),
    "update": (setup_plain, op_update, ["table.update."]),
    "delete": (setup_plain, op_delete, ["table.delete."]),
    "batch": (setup_plain, op_batch, ["table.batch."]),
    "recycle": (setup_pending, op_insert, ["table.recycle."]),
    "rebuild": (setup_index_full, op_insert, ["table.rebuild."]),
    "grow": (setup_plain, op_grow, ["table.grow."]),
    "vacuum": (setup_holes, op_vacuum, ["table.vacuum.", "table.recycle."]),
    "clear": (setup_plain, op_clear, ["table.clear."]),
}


def _model(setup, op) -> tuple[dict, dict]:
    """The state before and after the operation, from a private store."""
    with Store(None, size=SMALL) as st:
        setup(st)
        old = dict(st.items())
        op(st)
        return old, dict(st.items())


def _count_points(setup, op, prefix: str) -> int:
    """How many crash points whose name starts with prefix the operation passes."""
    with Store(None, size=SMALL) as st:
        setup(st)
        _core.fault(1 << 30, prefix)
        try:
            op(st)
        finally:
            left = _core.fault(0)
    return (1 << 30) - left


def _crash_child(name: str, op, k: int) -> int:
    """Run op in a forked child armed to die at table crash point k; its status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            st = Store.open(name)
            _core.fault(k, "table.")
            op(st)
            code = 0 if _core.fault(0) > 0 else 3
        except BaseException:
            import traceback
            traceback.print_exc()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_at_every_crash_point_leaves_old_or_new(names, case):
    setup, op, wanted = CASES[case]
    old, new = _model(setup, op)
    assert (old == new) == (case == "vacuum")  # vacuum moves records, changes none
    kills = 0
    for k in range(1, 2000):
        name = names()
        with Store(name, size=SMALL) as st:
            setup(st)
        status = _crash_child(name, op, k)
        with Store.open(name) as st:
            st.verify()  # takes the lock: repairs after the dead child
            got = dict(st.items())
            assert got == old or got == new, (case, k, set(got.items()) ^ set(old.items()))
            assert len(st) == len(got)
            for key, value in got.items():
                assert st[key] == value
            # the store goes on working after the repair
            st["after"] = 1
            assert st["after"] == 1
            st.verify()
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, (case, k, status)
            assert got == new
            break
        assert os.WIFSIGNALED(status), (case, k, status)
        kills += 1
    else:
        pytest.fail(f"{case}: the operation never completed")
    assert kills >= 3, (case, kills)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_operation_passes_the_crash_points_of_its_steps(case):
    setup, op, wanted = CASES[case]
    for prefix in wanted:
        assert _count_points(setup, op, prefix) > 0, (case, prefix)
