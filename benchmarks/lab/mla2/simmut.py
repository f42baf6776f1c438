import numpy as np, sim2
src = open('sim2.py').read()
muts = {
 "V desc LBO/SBO swapped": ("make_desc(tile_u + kk * 2048, DB_BYTES, 1024)", "make_desc(tile_u + kk * 2048, 1024, DB_BYTES)"),
 "P frag reg order a1<->a2": ("pa[kk, :, :, reg, 0] = sr[:, :, 8 * kk + 2 * reg]\n                pa[kk, :, :, reg, 1] = sr[:, :, 8 * kk + 2 * reg + 1]",
                              "rr = [0, 2, 1, 3][reg]\n                pa[kk, :, :, reg, 0] = sr[:, :, 8 * kk + 2 * rr]\n                pa[kk, :, :, reg, 1] = sr[:, :, 8 * kk + 2 * rr + 1]"),
 "sP without swizzle": ("cofs = ((j ^ G) << 4) + 4 * TQ", "cofs = (j << 4) + 4 * TQ"),
 "K k-step +16B": ("(kk & 3) * 32, 16, 1024), 64)\n            s = wgmma", "(kk & 3) * 16, 16, 1024), 64)\n            s = wgmma"),
 "WG1 V half wrong": ("tile_u + 4 * DB_BYTES + kk * 2048", "tile_u + 3 * DB_BYTES + kk * 2048"),
}
for name, (a, b) in muts.items():
    assert a in src, name
    ns = {}
    code = src.replace(a, b).replace('if __name__ == "__main__":', 'if False:')
    exec(compile(code, 'm', 'exec'), ns)
    try:
        e, l = ns['run_case'](64, 64, [100, 64], False, 'f16', 1 << 20, 0)
        print("  ->", name, "DETECTED" if e > 2e-2 or l > 2e-2 else "NOT DETECTED")
    except AssertionError as ex:
        print("  ->", name, "DETECTED (assert)", ex)
