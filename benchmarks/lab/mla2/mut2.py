import protocol as P
orig1 = P.wg1
def run(name, f1):
    P.wg1 = f1; bad = []
    for nt in range(1, 6):
        errs, _, _ = P.check(nt, True); bad += errs
    P.wg1 = orig1
    print(f"{name}: {len(bad)} errors; e.g. {sorted(set(e.split(': ',1)[1][:70] for e in bad))[:2]}")
def m(nt, fp8):  # refill raw before KV_FULL sync
    ev = orig1(nt, fp8); out = []; i = 0
    while i < len(ev):
        if ev[i] == ('sync', 'KV_FULL') and i + 1 < len(ev) and ev[i+1][0] == 'wbeg' and ev[i+1][3] == 'cp':
            out += [ev[i+1], ev[i]]; i += 2; continue
        out.append(ev[i]); i += 1
    return out
run("fp8 raw refill before KV_FULL", m)
def m2(nt, fp8):  # no cp wait before CONV: move the 'wend cp' events after the CONV sync
    ev = orig1(nt, fp8); out = []; held = []
    for e in ev:
        if e[0] == 'wend' and e[3] == 'cp': held.append(e); continue
        out.append(e)
        if e == ('sync', 'CONV') or e == ('sync', 'ALL'):
            out += held; held = []
    return out
run("fp8 no cp wait before CONV", m2)
