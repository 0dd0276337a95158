#!/usr/bin/env python3
"""cg_sites.py CALLGRIND_OUT CALLEE_PART N [BINARY]: from a
`--dump-instr=yes` run, each call site of the functions whose name holds
CALLEE_PART (memcpy, say): the caller, the call's address, its calls and
inclusive cost per message (EV=D1mw or another event of a `--cache-sim=yes`
run instead of instructions), and with BINARY the source line of the call
(addr2line). Which one of thirty memcpy calls in a function misses."""
import os, subprocess, sys, collections
from cgfile import name

out, target, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
binary = sys.argv[4] if len(sys.argv) > 4 else None
names = {}; fn = None; cfn = None; pending = None
npos, col, pos = 1, 1, 0
acc = collections.Counter(); calls = collections.Counter()


def position(tok, cur):
    """callgrind's compressed instruction position: 0x.. absolute, +n / -n
    relative to the last, * the same."""
    if tok == '*':
        return cur
    if tok[0] in '+-':
        return cur + int(tok, 0)
    return int(tok, 0)


for line in open(out, errors='replace'):
    if line.startswith('positions:'):
        npos = len(line.split()) - 1; continue
    if line.startswith('events:'):
        col = npos + line.split()[1:].index(os.environ.get('EV', 'Ir')); continue
    if line.startswith('fn='):
        fn = name(line[3:].strip(), names); continue
    if line.startswith('cfn='):
        cfn = name(line[4:].strip(), names); continue
    if line.startswith('calls='):
        pending = int(line[6:].split()[0]); continue
    if line[:1].isdigit() or line[:1] in '+-*':
        parts = line.split()
        pos = position(parts[0], pos)
        if pending is not None:
            if cfn and target in cfn:
                v = int(parts[col]) if col < len(parts) else 0
                acc[(fn, pos)] += v; calls[(fn, pos)] += pending
            pending = None
        continue
    if line.startswith(('fl=', 'fi=', 'fe=', 'ob=', 'cob=', 'cfi=', 'cfl=')):
        continue

top = acc.most_common(int(os.environ.get('TOP', '20')))
where = {}
if binary and top:
    addrs = [hex(a) for (_, a), _ in top]
    res = subprocess.run(['addr2line', '-e', binary, '-i', '-a'] + addrs,
                         capture_output=True, text=True).stdout.split('\n')
    cur = None
    for l in res:
        if l.startswith('0x'):
            cur = int(l, 16); where[cur] = []
        elif l and cur is not None:
            where[cur].append(l.rsplit('/', 2)[-2:] and '/'.join(l.rsplit('/', 2)[-2:]))
for (f, a), v in top:
    print(f"{v/N:9.1f} {calls[(f, a)]/N:6.2f} calls/msg {a:#x} {f[:90]}")
    for w in where.get(a, [])[:4]:
        print(f"{'':28}{w}")
