import protocol as P
orig0, orig1 = P.wg0, P.wg1
def run(name, f0=None, f1=None):
    P.wg0 = f0 or orig0; P.wg1 = f1 or orig1
    bad = 0; msgs = set()
    for fp8 in (False, True):
        for nt in range(1, 6):
            errs, _, _ = P.check(nt, fp8)
            bad += len(errs); msgs |= set(e.split(': ',1)[1][:60] for e in errs)
    print(f"{name}: {bad} errors; e.g. {sorted(msgs)[:2]}")
# 1: WG1 never waits KV_EMPTY
def m1(nt, fp8): return [e for e in orig1(nt, fp8) if e != ('sync', 'KV_EMPTY')]
run("no KV_EMPTY sync", f1=m1)
def m1b(nt, fp8): 
    return [e for e in orig0(nt, fp8) if e != ('arrive', 'KV_EMPTY')]
run("no KV_EMPTY arrive", f0=m1b)
# 2: P_EMPTY arrive before KV_EMPTY sync
def m2(nt, fp8):
    ev = orig1(nt, fp8); out = []
    i = 0
    while i < len(ev):
        if ev[i] == ('sync','KV_EMPTY') and i+1 < len(ev) and ev[i+1] == ('arrive','P_EMPTY'):
            out += [ev[i+1], ev[i]]; i += 2
        else:
            out.append(ev[i]); i += 1
    return out
run("P_EMPTY before KV_EMPTY", f1=m2)
# 3: WG0 doesn't sync P_EMPTY
def m3(nt, fp8): return [e for e in orig0(nt, fp8) if e != ('sync', 'P_EMPTY')]
run("no P_EMPTY sync", f0=m3)
# 4: fp8 uses the 16-bit WG0 ordering (overlap) -> deadlock expected
def m4(nt, fp8):
    if not fp8: return orig0(nt, fp8)
    # emulate: KV_EMPTY arrive moved after next KV_FULL sync
    ev = orig0(nt, fp8); out = []; pend = None
    for e in ev:
        if e == ('arrive','KV_EMPTY'): pend = e; continue
        out.append(e)
        if e == ('sync','KV_FULL') and pend: out.append(pend); pend = None
    return out
run("fp8 overlapped", f0=m4)
# 5: WG1 issues the refill before KV_EMPTY sync (hazard, barrier counts unchanged)
def m5(nt, fp8):
    ev = orig1(nt, fp8); out = []
    i = 0
    while i < len(ev):
        if ev[i] == ('sync','KV_EMPTY'):
            # find next wbeg and move it before
            j = next((k for k in range(i, len(ev)) if ev[k][0] == 'wbeg'), None)
            if j is not None:
                out.append(ev[j]); out += [e for k, e in enumerate(ev[i:j+1]) if k + i != j]; i = j + 1; continue
        out.append(ev[i]); i += 1
    return out
run("refill before KV_EMPTY", f1=m5)
# 6: WG0 writes P before P_EMPTY sync
def m6(nt, fp8):
    ev = orig0(nt, fp8); out = []; i = 0
    while i < len(ev):
        if ev[i] == ('sync','P_EMPTY'):
            out += [ev[i+1], ev[i+2], ev[i]]; i += 3; continue
        out.append(ev[i]); i += 1
    return out
run("P write before P_EMPTY", f0=m6)
