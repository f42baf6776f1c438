"""Exhaustive interleaving check of the named-barrier protocol of templates/mla2.cu.jinja.

Each warpgroup is a straight-line list of events generated from the kernel's loop (for a given
ntiles and FP8 flag). Named barrier semantics (bar.sync / bar.arrive with count 256 = both WGs):
each WG contributes 128 per op; when a barrier's count reaches 256 it completes and releases the
WGs waiting in bar.sync on it. Checked over ALL interleavings:
  * no deadlock (every run ends with both WGs finished),
  * no barrier instance receives two contributions from the same WG (that would complete it with
    nobody from the other side: mis-phasing),
  * storage hazards: a write interval to a buffer never overlaps another access with another tile,
    and every read of tile n from a buffer sees the buffer's last completed write be tile n.
"""
import sys
from functools import lru_cache

NSTAGES = 2

def wg0(ntiles, fp8):
    ev = []
    if fp8:
        ev.append(('sync', 'CONV'))
        ev += [('rbeg', ('raw', 0), 0, 'cvt0'), ('wbeg', ('conv',), 0, 'cvt0'),
               ('wend', ('conv',), 0, 'cvt0'), ('rend', ('raw', 0), 0, 'cvt0')]
        ev.append(('sync', 'KV_FULL'))
    loc = (lambda n: ('conv',)) if fp8 else (lambda n: ('stage', n % NSTAGES))
    for n in range(ntiles):
        if not fp8:
            ev.append(('sync', 'KV_FULL'))
        ev.append(('rbeg', loc(n), n, 'S+PV0'))          # S(n) issued (and PV0(n) later)
        if not fp8 and n > 0:
            ev.append(('rend', loc(n - 1), n - 1, 'S+PV0'))  # wait<1>: PV0(n-1) done
            if n - 1 + NSTAGES < ntiles:
                ev.append(('arrive', 'KV_EMPTY'))
        # wait<0>; softmax
        if n > 0:
            ev.append(('sync', 'P_EMPTY'))
        ev.append(('wbeg', ('P',), n, 'P'))
        ev.append(('wend', ('P',), n, 'P'))
        ev.append(('arrive', 'P_FULL'))
        if fp8:
            ev.append(('rend', loc(n), n, 'S+PV0'))
            if n + 1 < ntiles:
                ev.append(('sync', 'CONV'))
                r = ('raw', (n + 1) % NSTAGES)
                ev += [('rbeg', r, n + 1, 'cvt0'), ('wbeg', ('conv',), n + 1, 'cvt0'),
                       ('wend', ('conv',), n + 1, 'cvt0'), ('rend', r, n + 1, 'cvt0')]
                ev.append(('sync', 'KV_FULL'))
    if not fp8:
        ev.append(('rend', loc(ntiles - 1), ntiles - 1, 'S+PV0'))
    ev.append(('sync', 'ALL'))
    return ev

def wg1(ntiles, fp8):
    ev = []
    pending = []  # cp.async groups in commit order: (loc, tile) or None (empty group)
    def issue(loc, tile):
        ev.append(('wbeg', loc, tile, 'cp'))
        pending.append((loc, tile))
    def commit_empty():
        pending.append(None)
    def wait(k):  # cp.async.wait_group k: all but the k most recent groups complete
        while len(pending) > k:
            g = pending.pop(0)
            if g is not None:
                ev.append(('wend', g[0], g[1], 'cp'))
    raw = lambda t: ('raw', t % NSTAGES)
    st = lambda t: ('stage', t % NSTAGES)
    for s in range(NSTAGES):
        if s < ntiles:
            issue(raw(s) if fp8 else st(s), s)
        else:
            commit_empty()
    def convert(t):
        ev.append(('rbeg', raw(t), t, 'cvt1'))
        ev.append(('wbeg', ('conv',), t, 'cvt1'))
        ev.append(('wend', ('conv',), t, 'cvt1'))
        ev.append(('rend', raw(t), t, 'cvt1'))
    wait(NSTAGES - 1)
    if fp8:
        ev.append(('sync', 'CONV'))
        convert(0)
        ev.append(('sync', 'KV_FULL'))
        if NSTAGES < ntiles:
            issue(raw(NSTAGES), NSTAGES)
        else:
            commit_empty()
    else:
        ev.append(('arrive', 'KV_FULL'))
    for n in range(ntiles):
        tl = ('conv',) if fp8 else st(n)
        ev.append(('sync', 'P_FULL'))
        ev.append(('rbeg', ('P',), n, 'PV1'))
        ev.append(('rbeg', tl, n, 'PV1'))
        if not fp8 and n + 1 < ntiles:
            wait(0)
            ev.append(('arrive', 'KV_FULL'))
        ev.append(('rend', ('P',), n, 'PV1'))
        ev.append(('rend', tl, n, 'PV1'))
        if fp8:
            if n + 1 < ntiles:
                ev.append(('arrive', 'P_EMPTY'))
                wait(NSTAGES - 1)
                ev.append(('sync', 'CONV'))
                convert(n + 1)
                ev.append(('sync', 'KV_FULL'))
                if n + 1 + NSTAGES < ntiles:
                    issue(raw(n + 1 + NSTAGES), n + 1 + NSTAGES)
                else:
                    commit_empty()
        else:
            if n + NSTAGES < ntiles:
                ev.append(('sync', 'KV_EMPTY'))
            if n + 1 < ntiles:
                ev.append(('arrive', 'P_EMPTY'))
            if n + NSTAGES < ntiles:
                issue(st(n + NSTAGES), n + NSTAGES)
            else:
                commit_empty()
    wait(0)
    ev.append(('sync', 'ALL'))
    return ev

def check(ntiles, fp8):
    progs = (tuple(wg0(ntiles, fp8)), tuple(wg1(ntiles, fp8)))
    bars = ('KV_FULL', 'P_FULL', 'P_EMPTY', 'KV_EMPTY', 'CONV', 'ALL')
    errors = []
    seen = set()
    # state: pcs, per-barrier contributions (frozenset of WG ids), waiting flags, buffer state
    # buffer state: dict loc -> (last completed write tile, open accesses tuple)
    init = ((0, 0), tuple(() for _ in bars), (False, False), ())
    stack = [init]
    finals = 0
    while stack:
        st_ = stack.pop()
        if st_ in seen:
            continue
        seen.add(st_)
        pcs, contrib, waiting, bufs = st_
        bufd = {k: v for k, v in bufs}
        moved = False
        for w in (0, 1):
            if waiting[w]:
                continue
            if pcs[w] >= len(progs[w]):
                continue
            e = progs[w][pcs[w]]
            npcs = list(pcs); npcs[w] += 1
            ncontrib = list(contrib); nwaiting = list(waiting)
            nbuf = dict(bufd)
            if e[0] in ('arrive', 'sync'):
                bi = bars.index(e[1])
                if w in ncontrib[bi]:
                    errors.append(f"ntiles={ntiles} fp8={fp8}: WG{w} contributes twice to {e[1]} at pc {pcs[w]}")
                    continue
                c = ncontrib[bi] + (w,)
                if e[0] == 'sync':
                    nwaiting[w] = True
                if len(c) == 2:  # complete: release waiters on this barrier
                    c = ()
                    for v in (0, 1):
                        if nwaiting[v] and progs[v][npcs[v] - 1 if v == w else pcs[v] - 1][1] == e[1]:
                            nwaiting[v] = False
                    # the waiter that was blocked earlier sits at pc-1 of its program (already advanced)
                ncontrib[bi] = c
            else:
                kind, loc, tile, who = e
                last, opens = nbuf.get(loc, (None, ()))
                if kind in ('rbeg', 'wbeg'):
                    for (k2, t2, w2) in opens:
                        if (kind == 'wbeg' or k2 == 'w') and not (k2 == kind[0] and t2 == tile):
                            if t2 != tile or kind == 'wbeg' or k2 == 'w':
                                errors.append(f"ntiles={ntiles} fp8={fp8}: hazard on {loc}: {kind} tile {tile} by WG{w}/{who} while {k2} tile {t2} ({w2}) open")
                    if kind == 'rbeg' and last != tile:
                        errors.append(f"ntiles={ntiles} fp8={fp8}: WG{w}/{who} reads {loc} for tile {tile} but it holds {last}")
                    opens = opens + ((kind[0], tile, who),)
                else:
                    k = kind[0]
                    lst = list(opens)
                    lst.remove((k, tile, who))
                    opens = tuple(lst)
                    if kind == 'wend':
                        last = tile
                nbuf[loc] = (last, opens)
            nst = (tuple(npcs), tuple(ncontrib), tuple(nwaiting), tuple(sorted(nbuf.items(), key=str)))
            stack.append(nst)
            moved = True
        if not moved:
            if pcs[0] >= len(progs[0]) and pcs[1] >= len(progs[1]) and not any(waiting):
                finals += 1
            else:
                errors.append(f"ntiles={ntiles} fp8={fp8}: DEADLOCK at pcs {pcs} waiting {waiting}: "
                              f"WG0 at {progs[0][pcs[0]-1] if pcs[0] else None}, WG1 at {progs[1][pcs[1]-1] if pcs[1] else None}")
        if len(errors) > 20:
            break
    return errors, len(seen), finals

ok = True
for fp8 in (False, True):
    for nt in range(1, 8):
        errs, nstates, finals = check(nt, fp8)
        print(f"fp8={fp8} ntiles={nt}: states={nstates} terminal={finals} errors={len(errs)}")
        for e in sorted(set(errs))[:8]:
            print("   ", e)
        ok &= not errs
print("PROTOCOL OK" if ok else "PROTOCOL ERRORS")
