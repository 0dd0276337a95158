#!/usr/bin/env python3
"""cg_callers.py CALLGRIND_OUT NAME_PART N: who calls the functions whose name holds NAME_PART, and the inclusive cost per message of those calls."""
import sys, re, collections
names = {}; fn=None; cfn=None; skip=False; acc=collections.Counter()
target = sys.argv[2]; N=int(sys.argv[3])
def nm(tok):
    m = re.match(r'\((\d+)\)(?:\s+(.*))?', tok)
    if m:
        if m.group(2): names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))
    return tok
for line in open(sys.argv[1], errors='replace'):
    if line.startswith('fn='): fn = nm(line[3:].strip()); continue
    if line.startswith('cfn='): cfn = nm(line[4:].strip()); continue
    if line.startswith('calls='): skip=True; continue
    if skip and line[:1].isdigit() or (skip and line[:1] in '+-*'):
        skip=False
        if target in cfn: acc[fn] += int(line.split()[1])
for f,c in acc.most_common(15): print(f"{c/N:10.0f} {f[:180]}")
