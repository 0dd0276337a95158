#!/usr/bin/env python3
"""dhat_sites.py OUT1 N1 OUT2 N2 [TOP=30]: heap blocks touched per message.

From two DHAT runs of dhat.sh (N1 and N2 messages, the same sessions): each
allocation site's bytes read and written, blocks allocated and, for blocks of
at most 1 KiB (DHAT keeps a per-offset histogram only for those), the bytes
and 64-byte lines of a block that a message touches; all as (run 2 - run 1)
/ (N2 - N1), so the start-up drops out. "lines" counts the offsets touched
at least once per message summed over the site's blocks: for a block per
session or per backend connection, the lines of it each message touches.

Caveat: valgrind counts a recv's whole buffer as written (its wrapper marks
the length asked for, not the length received), so an input buffer's
writes are the room offered per read, not the bytes that came."""
import json
import re
import sys

SKIP = ('library/', 'vgpreload', '(alloc.rs', '(unix.rs', '(raw_vec', '(string.rs',
        '(fmt.rs', '(boxed.rs', 'bytes_mut.rs', '(spec_from', '(vec/')


def load(path):
    d = json.load(open(path))
    ftbl = d['ftbl']
    sites = {}
    for pp in d['pps']:
        frames = tuple(re.sub(r'^0x[0-9A-Fa-f]+: ', '', ftbl[i]) for i in pp['fs'])
        acc = None
        if 'acc' in pp:
            acc, a = [], pp['acc']
            i = 0
            while i < len(a):
                if a[i] < 0:
                    acc += [a[i + 1]] * (-a[i])
                    i += 2
                else:
                    acc.append(a[i])
                    i += 1
        old = sites.get(frames)
        if old:  # the same stack twice (rare): summed
            old['rb'] += pp['rb']; old['wb'] += pp['wb']; old['tbk'] += pp['tbk']; old['tb'] += pp['tb']
            if old['acc'] and acc and len(old['acc']) == len(acc):
                old['acc'] = [x + y for x, y in zip(old['acc'], acc)]
            continue
        sites[frames] = {'rb': pp['rb'], 'wb': pp['wb'], 'tbk': pp['tbk'], 'tb': pp['tb'], 'acc': acc}
    return sites


def main():
    a, n1, b, n2 = load(sys.argv[1]), int(sys.argv[2]), load(sys.argv[3]), int(sys.argv[4])
    top = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    n = n2 - n1
    rows = []
    for k, s in b.items():
        z = a.get(k, {'rb': 0, 'wb': 0, 'tbk': 0, 'tb': 0, 'acc': None})
        rb, wb = (s['rb'] - z['rb']) / n, (s['wb'] - z['wb']) / n
        blocks = (s['tbk'] - z['tbk']) / n
        size = s['tb'] / max(s['tbk'], 1)
        hot = lines = '-'
        if s['acc'] is not None and (z['acc'] is None or len(z['acc']) == len(s['acc'])):
            d = [x - y for x, y in zip(s['acc'], z['acc'] or [0] * len(s['acc']))]
            touched = [i for i, x in enumerate(d) if x >= n]
            hot, lines = len(touched), len({i // 64 for i in touched})
        rows.append((rb + wb, rb, wb, blocks, size, s['tbk'], hot, lines,
                     [f for f in k if not any(x in f for x in SKIP)][:3]))
    rows.sort(key=lambda r: -r[0])
    print('per message: bytes read, written; blocks allocated; a block\'s size; blocks in run 2; bytes, lines touched')
    for r in rows[:top]:
        print(f'{r[1]:8.1f} rd {r[2]:8.1f} wr {r[3]:6.2f} blk  size {r[4]:6.0f} ({r[5]} blocks)  touched {r[6]} B, {r[7]} lines')
        for f in r[8]:
            print('        ', f[:150])
    tot = sum(r[0] for r in rows)
    print(f'all sites: {tot:.0f} bytes read and written per message')


main()
