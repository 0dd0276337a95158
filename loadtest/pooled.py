#!/usr/bin/env python3
"""Pools the per-repeat ratios of several `cores.sh` runs.

Usage: pooled.py DIR:PROXY [DIR:PROXY ...]

Each DIR is a `cores.sh` KEEP_RUNS directory (files T.MODE.PROXY.REPEAT.json);
PROXY names which of its proxies to take (smtp-edge, smtp-edge-alt,
smtp-edge@FLAVOR), so the same build can be gathered from runs where it
was the main binary in one and the alternate in another. Each repeat's
msgs/s is divided by HAProxy's in the same run, T, mode and repeat; all of
them are pooled into one median, mean and range, and split into thirds by
HAProxy's own rate in its repeat (how busy the host was). This is how
loadtest/RESULTS.md sections 31 and 32 pool a build's repeats across runs.
"""
import json
import os
import statistics
import sys


def ratios(spec):
    d, proxy = spec.rsplit(":", 1)
    out = []
    for f in sorted(os.listdir(d)):
        parts = f[: -len(".json")].split(".", 3) if f.endswith(".json") else []
        if len(parts) != 4 or parts[2] != proxy:
            continue
        t, mode, _, rep = parts
        hap = os.path.join(d, f"{t}.{mode}.haproxy.{rep}.json")
        if not os.path.exists(hap):
            continue
        with open(os.path.join(d, f)) as fe, open(hap) as fh:
            e, h = json.load(fe)["msgs_per_sec"], json.load(fh)["msgs_per_sec"]
        if h > 0:
            out.append((h, e / h))
    return out


def main(args):
    if not args:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rs = sorted(r for spec in args for r in ratios(spec))
    if not rs:
        print("no repeats found", file=sys.stderr)
        return 1
    r = [x[1] for x in rs]
    print(
        f"{len(r)} repeats: median {statistics.median(r):.3f}, mean {statistics.mean(r):.3f}, "
        f"range {min(r):.2f}-{max(r):.2f}, at or above 0.9 in {sum(x >= 0.9 for x in r)}"
    )
    k = len(rs) // 3
    if k:
        for name, part in (
            ("slowest third", rs[:k]),
            ("middle", rs[k : len(rs) - k]),
            ("fastest third", rs[len(rs) - k :]),
        ):
            print(
                f"  {name} (HAProxy {part[0][0]:.0f}-{part[-1][0]:.0f} msgs/s): "
                f"median {statistics.median([x[1] for x in part]):.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
