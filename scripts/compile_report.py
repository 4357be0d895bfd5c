"""Where a test run's numba compile time went: run the suite with SELFATTN_COMPILE_LOG=DIR, then

    python scripts/compile_report.py DIR

prints the total compile time (thread CPU seconds) per process, the functions compiled in more than one process (each
xdist worker and each subprocess compiles what the on-disk cache does not hold yet), and the tests
that paid the most compile time.
"""

from __future__ import annotations

import collections
import glob
import os
import sys


def main(directory: str) -> None:
    rows = []
    for path in glob.glob(os.path.join(directory, "compile-*.tsv")):
        with open(path) as f:
            for line in f:
                sec, pid, name, test = line.rstrip("\n").split("\t", 3)
                rows.append((float(sec), pid, name, test))
    if not rows:
        sys.exit(f"no compile-*.tsv files in {directory}: run the tests with SELFATTN_COMPILE_LOG={directory}")
    total = sum(r[0] for r in rows)
    per_pid = collections.Counter()
    per_fn = collections.defaultdict(list)
    per_test = collections.Counter()
    for sec, pid, name, test in rows:
        per_pid[pid] += sec
        per_fn[name].append((sec, pid))
        per_test[test] += sec
    print(f"{len(rows)} compiles, {total:.0f} s in all, in {len(per_pid)} processes")
    for pid, sec in per_pid.most_common(12):
        print(f"  pid {pid}: {sec:7.1f} s")
    dup = sorted(((sum(s for s, _ in v), name, len({p for _, p in v}), len(v)) for name, v in per_fn.items()
                  if len({p for _, p in v}) > 1), reverse=True)
    print(f"functions compiled in more than one process: {sum(d[0] for d in dup):.0f} s in all")
    for sec, name, procs, n in dup[:25]:
        print(f"  {sec:7.1f} s  {name} ({n} compiles in {procs} processes)")
    print("tests that paid the most compile time:")
    for test, sec in per_test.most_common(25):
        print(f"  {sec:7.1f} s  {test}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
