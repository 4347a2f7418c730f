"""Fuzz the native DCP reader under AddressSanitizer and UndefinedBehaviorSanitizer.

    bash scripts/fuzz_dcpscan.sh [ROUNDS] [.metadata files...]

Builds the reader (pytest_miles/ckpt/dcpscan/*.c) with -fsanitize=address,undefined into a temp dir (the
package's own build is untouched), then scans random mutations (byte changes, bit flips,
deletions, insertions, self-splices, truncations) of each given `.metadata` (default: fresh DCP
saves of a few shapes). Any memory error or undefined behaviour aborts with the sanitizer's report;
the run prints how many mutations it scanned and how many the reader vouched for. The verdict side
(what it vouches for, the full Python path agrees) is tests/ckpt/test_dcp_native.py's fuzz.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time


def mutate(rng: random.Random, good: bytes) -> bytes:
    m = bytearray(good)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        if not m:
            break
        how, at = rng.random(), rng.randrange(len(m))
        if how < 0.5:
            m[at] = rng.randrange(256)
        elif how < 0.6:
            m[at] ^= 1 << rng.randrange(8)
        elif how < 0.7:
            del m[at:at + rng.randrange(1, 64)]
        elif how < 0.8:
            m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif how < 0.9:  # a piece of itself elsewhere: memo references, marks, frames out of place
            b = rng.randrange(len(m))
            m[at:at] = m[b:b + rng.randrange(1, 200)]
        else:
            del m[at:]
    return bytes(m)


def main() -> None:
    build, rounds, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, build)
    import _dcpscan

    assert _dcpscan.__file__.startswith(build), _dcpscan.__file__
    rng = random.Random(7)
    scanned = vouched = 0
    t0 = time.time()
    for f in files:
        good = open(f, "rb").read()
        assert _dcpscan.scan(good) is not None, f"{f}: the reader does not vouch for the unmutated file"
        for k in range(rounds if len(good) < 2**20 else max(1, rounds // 200)):
            bad = mutate(rng, good)
            got = _dcpscan.scan(bad)
            vouched += got is not None
            scanned += 1
            if k % 20 == 0:  # scan_fd (read as it goes, pages given back behind) must say the same
                with tempfile.TemporaryFile() as tf:
                    tf.write(bad)
                    tf.flush()
                    assert _dcpscan.scan_fd(tf.fileno(), len(bad)) == got, f"{f}: scan_fd differs from scan"
        _dcpscan.release()
    print(f"asan+ubsan: {scanned} mutated scans of {len(files)} file(s), {vouched} vouched for, no sanitizer "
          f"report, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
