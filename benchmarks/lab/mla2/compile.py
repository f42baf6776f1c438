import os, sys, subprocess, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))
from xqa_jit.spec import MlaSpec
from xqa_jit.render import render
vs = []
for q, kv in [("fp16","fp16"),("bf16","bf16"),("fp16","e4m3"),("bf16","e4m3")]:
    for h in (16,32,64,128):
        vs.append(MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=h, impl="v2"))
vs.append(MlaSpec(debug=True, impl="v2"))
sel = [a for a in sys.argv[1:] if not a.startswith('-')]
sass = '--sass' in sys.argv
if sel: vs = [v for v in vs if any(x in v.name for x in sel)]
def job(v):
    src=f'/tmp/mla2/{v.name}.cu'; open(src,'w').write(render(v))
    t=time.time()
    r=subprocess.run(['nvcc','-O3','-std=c++17','-Xptxas=-v,-warn-spills','-gencode=arch=compute_90a,code=sm_90a','-cubin','-o',f'/tmp/mla2/{v.name}.cubin',src],capture_output=True,text=True)
    if sass and r.returncode == 0:
        s = subprocess.run(['/tmp/tools/nvidia/cu13/bin/cuobjdump','-sass',f'/tmp/mla2/{v.name}.cubin'],capture_output=True,text=True).stdout
        open(f'/tmp/mla2/{v.name}.sass','w').write(s)
    return v, r, time.time()-t
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(9) as ex:
    for v,r,dt in ex.map(job, vs):
        lines=[l for l in r.stderr.splitlines() if 'Used' in l or 'spill' in l or 'error' in l.lower() or 'warning' in l.lower() or 'smem' in l]
        print(v.name, f'{dt:.1f}s rc={r.returncode}')
        for l in lines: print('   ', l.strip()[:300])
        if r.returncode: print(r.stderr[:4000])
