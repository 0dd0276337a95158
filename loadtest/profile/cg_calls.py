#!/usr/bin/env python3
"""cg_calls.py CALLGRIND_OUT NAME_PART N [callers|callees]: who calls the
functions whose name holds NAME_PART (default), or what they call, with the
inclusive cost and the calls per message. EV=D1mw (or any event of a
`--cache-sim=yes` run) ranks by that event's inclusive count instead of
instructions: which call of a shared function (memcpy) misses."""
import os, sys, collections
names = {}; fn = None; cfn = None; skip = False; ncalls = 0
acc = collections.Counter(); calls = collections.Counter()
target, N = sys.argv[2], int(sys.argv[3])
callees = len(sys.argv) > 4 and sys.argv[4] == "callees"
from cgfile import name
def nm(tok):
    return name(tok, names)
npos, col = 1, 1
for line in open(sys.argv[1], errors='replace'):
    if line.startswith('positions:'):
        npos = len(line.split()) - 1; continue
    if line.startswith('events:'):
        col = npos + line.split()[1:].index(os.environ.get('EV', 'Ir')); continue
    if line.startswith('fn='): fn = nm(line[3:].strip()); continue
    if line.startswith('cfn='): cfn = nm(line[4:].strip()); continue
    if line.startswith('calls='): skip = True; ncalls = int(line[6:].split()[0]); continue
    if skip and (line[:1].isdigit() or line[:1] in '+-*'):
        skip = False
        inner, outer = (fn, cfn) if callees else (cfn, fn)
        if target in inner:
            parts = line.split()
            acc[outer] += int(parts[col]) if col < len(parts) else 0; calls[outer] += ncalls
for f, c in acc.most_common(15):
    print(f"{c/N:10.1f} calls/msg {calls[f]/N:6.2f} {f[:150]}")
