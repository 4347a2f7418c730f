"""The full comparison's workers (`layout_compare._in_threads`, which replaced a ThreadPoolExecutor to
keep `concurrent.futures` and `logging` out of `compare`'s start-up): every call's result or
exception in call order, calls taken in order, never more threads than asked."""

from __future__ import annotations

import threading
import time

from pytest_miles.checks.layout_compare import _in_threads


def test_results_and_exceptions_in_call_order_on_at_most_nworkers_threads():
    seen: set[int] = set()
    running, peak, lock = [0], [0], threading.Lock()

    def fn(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.add(threading.get_ident())
        time.sleep(0.002 * (i % 3))
        with lock:
            running[0] -= 1
        if i == 4:
            raise ValueError("call 4")
        return i * i

    out = _in_threads(fn, [(i,) for i in range(9)], 2)
    assert [ok for ok, _ in out] == [i != 4 for i in range(9)]
    assert [got for ok, got in out if ok] == [i * i for i in range(9) if i != 4]
    assert isinstance(out[4][1], ValueError) and str(out[4][1]) == "call 4"
    assert peak[0] <= 2 and len(seen) <= 2 and threading.get_ident() not in seen
    assert _in_threads(fn, [], 2) == []
    assert _in_threads(fn, [(1,)], 4) == [(True, 1)]  # one call: one thread
