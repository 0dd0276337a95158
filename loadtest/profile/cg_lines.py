#!/usr/bin/env python3
"""cg_lines.py CALLGRIND_OUT N [SHARE=0.5]: the code a message runs, in cache lines.

From a `CG_ARGS=--dump-instr=yes` run of cg.sh: every instruction run at
least SHARE x N times (N messages: once in every other message or more)
is hot; prints how many 64-byte lines hold hot code, how many bytes of it
they hold (utilisation: what a perfect hot/cold layout could pack them
into), per object and per function (loadtest/RESULTS.md section 29).
Instruction sizes are the gaps between the executed addresses (at most
15), an estimate."""
import sys, collections
f=sys.argv[1]; N=int(sys.argv[2]); TH=float(sys.argv[3]) if len(sys.argv)>3 else 0.5
cnt=collections.defaultdict(int)   # (ob,addr)->Ir
fnof={}
names={}
ob=None; fn=None; last=0; skip=False
from cgfile import name as nm
obn={}
for line in open(f,errors='replace'):
    if line.startswith('ob='): ob=nm(line[3:].strip(),obn); continue
    if line.startswith('fn='): fn=nm(line[3:].strip(),names); continue
    if line.startswith(('cfn=','cob=','cfl=','cfi=')):
        if line.startswith('cfn='): nm(line[4:].strip(),names)
        if line.startswith('cob='): nm(line[4:].strip(),obn)
        continue
    if line.startswith('calls='): skip=True; continue
    c=line[0] if line else ''
    if c=='0' or c in '+-*':
        p=line.split()
        a=p[0]
        if a.startswith('0x'): addr=int(a,16)
        elif a=='*': addr=last
        else: addr=last+int(a)
        last=addr
        if skip: skip=False; continue
        if len(p)>=3:
            cnt[(ob,addr)]+=int(p[2]); fnof[(ob,addr)]=fn
# sizes by gap
byob=collections.defaultdict(list)
for (o,a) in cnt: byob[o].append(a)
hotlines=collections.defaultdict(set); hotbytes=collections.Counter(); fnlines=collections.defaultdict(set); fnbytes=collections.Counter()
for o,addrs in byob.items():
    addrs.sort()
    for i,a in enumerate(addrs):
        c=cnt[(o,a)]
        if c < TH*N: continue
        sz=min(addrs[i+1]-a,15) if i+1<len(addrs) else 4
        if sz<=0: sz=4
        hotlines[o].add(a//64); hotbytes[o]+=sz
        fn=fnof[(o,a)]; fnlines[fn].add((o,a//64)); fnbytes[fn]+=sz
tl=sum(len(v) for v in hotlines.values()); tb=sum(hotbytes.values())
print(f"hot lines {tl}, hot bytes {tb}, utilisation {tb/(tl*64):.2f}")
for o in sorted(hotlines,key=lambda o:-len(hotlines[o])):
    print(f"  {len(hotlines[o]):5d} lines {hotbytes[o]:6d} B {hotbytes[o]/(64*len(hotlines[o])):.2f}  {o}")
print()
for fn in sorted(fnlines,key=lambda k:-len(fnlines[k]))[:30]:
    print(f"{len(fnlines[fn]):4d} lines {fnbytes[fn]:5d} B {fnbytes[fn]/(64*len(fnlines[fn])):.2f} {fn[:110]}")
