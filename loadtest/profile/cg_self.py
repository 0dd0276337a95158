#!/usr/bin/env python3
"""cg_self.py CALLGRIND_OUT N [TOP=50]: self cost (Ir) per function per message.

EV=I1mr (or any event of the file's `events:` line, such as D1mr or DLmw
from a `--cache-sim=yes` run) ranks by that event instead of Ir."""
import os, sys, collections
# self cost per function from a callgrind out file (Ir, or the event EV)
names = {}; self_ = collections.Counter(); incl_calls = collections.Counter()
fn = None; skip_next = False; cfn=None
from cgfile import name as nm
files = {}
npos, col = 1, 1
for line in open(sys.argv[1], errors='replace'):
    line = line.rstrip('\n')
    if line.startswith('positions:'):
        npos = len(line.split()) - 1; continue
    if line.startswith('events:'):
        col = npos + line.split()[1:].index(os.environ.get('EV', 'Ir')); continue
    if line.startswith('fn='):
        fn = nm(line[3:], names); continue
    if line.startswith('cfn='):
        cfn = nm(line[4:], names); continue
    if line.startswith('calls='):
        skip_next = True; continue
    if line and (line[0].isdigit() or line[0] in '+-*'):
        parts = line.split()
        if len(parts) >= 2:
            c = int(parts[col]) if len(parts) > col else 0
            if skip_next:
                incl_calls[(fn, cfn)] += c
                skip_next = False
            else:
                self_[fn] += c
        continue
tot = sum(self_.values()); N = int(sys.argv[2]) if len(sys.argv) > 2 else 1
for f, c in self_.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 50):
    print(f"{c/N:10.0f} {100*c/tot:5.1f}%  {f[:170]}")
