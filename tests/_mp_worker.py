"""One rank of the tensor-parallel decode test in tests/test_multi_gpu.py (run as a script, one process
per rank; not collected by pytest).

Each rank builds the same llama3-8b-like layer from a fixed seed (Hq=32, Hkv=8, D=128, bf16, page 16,
batch 8, lengths up to 3000), keeps its contiguous half of the query and KV heads, checks that the
kernel is not yet in the (fresh, shared) cache, meets the other rank at a barrier and calls
``xqa_jit.xqa`` at the same moment, so both race to build the same spec. The outputs are gathered
along the head dim. Rank 0 then replays the work on its own GPU alone: the whole layer in one call,
and each rank's shard call in turn; and runs ``xqa_reference``. Tensors go to ``OUT/rank0.pt``; each
rank writes ``OUT/rank<r>.json`` (what it saw of the cache, how many nvcc builds it ran). The test
(the parent process) asserts on those.

A failure prints the traceback to stderr and exits 1; the parent then kills the other rank (which may
be blocked in a collective) and shows both ranks' stderr.

``XQA_JIT_TEST_MP_DRYRUN=1`` is a CPU-only rehearsal of the plumbing (used by hand on machines with no
GPU): gloo instead of NCCL, tensors on the CPU, ``xqa_reference`` in place of the kernel, and the race
is on ``xqa_jit.build.build`` (a real nvcc build for sm_90a, no load). The results say which mode ran
and the real test requires ``"mode": "real"``, so the rehearsal can never make it pass.
"""
from __future__ import annotations

import os

# Before torch (and so before any CUDA or NCCL initialisation). Required on the H200 hosts: NVLink
# SHARP / multicast is not usable there.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NCCL_ENV)

import argparse
import json
import sys
import time
import traceback
from datetime import timedelta

DRYRUN_FLAG = "XQA_JIT_TEST_MP_DRYRUN"

# The layer: llama3-8b attention (32 query heads, 8 KV heads, head_dim 128), bf16, page size 16.
BATCH, HQ, HKV, HEAD_DIM, PAGE = 8, 32, 8, 128, 16
SEQ_LENS = [3000, 1, 16, 17, 129, 1023, 2048, 2999]  # one token, page edges, long (split-KV)
SEED = 0x5EED_2024


def make_layer(device):
    """(q, k_cache, v_cache, page_table, seq_lens) of the whole layer; identical on every rank."""
    import torch
    from helpers import make_generator, make_paged_kv, make_q

    gen = make_generator(SEED)
    kv = make_paged_kv(BATCH, HKV, HEAD_DIM, PAGE, SEQ_LENS, torch.bfloat16, "NHD", device, gen=gen)
    q = make_q(BATCH, HQ, HEAD_DIM, torch.bfloat16, gen, device=device)
    return q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens


def shard(layer, rank: int, world: int):
    """Rank ``rank``'s contiguous share of the heads: query heads [r*Hq/W, (r+1)*Hq/W) and the KV
    heads they read (GQA group Hq/Hkv is unchanged). Own, contiguous tensors, as a TP engine holds."""
    q, k, v, table, lens = layer
    hq, hkv = q.shape[1] // world, k.shape[2] // world
    return (q[:, rank * hq:(rank + 1) * hq].contiguous(),
            k[:, :, rank * hkv:(rank + 1) * hkv].contiguous(),
            v[:, :, rank * hkv:(rank + 1) * hkv].contiguous(), table, lens)


def split_plan_of(q):
    """(splits, chunk) that xqa chose for calls with q's shape and device, or None if unknown.

    Internal (xqa_jit.api's call cache); only used to tell whether two calls must agree bit for bit:
    with different split-KV plans the partial sums are merged in a different order."""
    try:
        from xqa_jit import api

        found = {(pl.splits, api._TAIL.unpack(pl.tail)[6]) for sig, pl in api._CALLS.items()
                 if sig[0] == q.shape and sig[3] == q.device}
        return list(found.pop()) if len(found) == 1 else None
    except Exception:  # noqa: BLE001 - best effort
        return None


def run(args) -> None:
    import torch
    import torch.distributed as dist

    import xqa_jit
    import xqa_jit.build as B
    from xqa_jit import DecodeSpec
    from xqa_jit.reference import xqa_reference

    dry = os.environ.get(DRYRUN_FLAG, "") not in ("", "0")
    rank, world = args.rank, args.world
    out_dir = args.out

    # Every nvcc build this process runs (the spec must be built once across both ranks).
    compiles = []
    real_compile = B._compile

    def counting_compile(p, tmp, verbose):
        compiles.append({"spec": p.spec.name, "arch": p.arch, "start": time.time()})
        return real_compile(p, tmp, verbose)

    B._compile = counting_compile

    if dry:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=args.timeout))
        arch = "9.0a"
    else:
        assert torch.cuda.device_count() >= world, f"{torch.cuda.device_count()} GPUs < {world}"
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=args.timeout),
                                device_id=device)
        arch = B.device_arch(rank)

    def attn(q, k, v, table, lens):
        if dry:  # rehearsal only: the parent test rejects results from this mode
            return xqa_reference(q, k, v, table, lens).to(q.dtype)
        return xqa_jit.xqa(q, k, v, table, lens)

    def sync():
        if not dry:
            torch.cuda.synchronize(device)

    layer = make_layer(device)
    mine = shard(layer, rank, world)
    spec = DecodeSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=HEAD_DIM, group=HQ // HKV,
                      debug=B._env_flag("XQA_JIT_DEBUG"))
    plan = B.plan(spec, arch)
    root = B.cache_root()
    published_before = B.read_entry(plan.entry, plan.key) is not None
    sync()

    dist.barrier()  # both ranks leave together and race to build the same spec
    t0 = time.time()
    if dry:
        B.build(plan)  # the race, for real (nvcc, no GPU); the "kernel" below is the reference
    out = attn(*mine)
    sync()
    first_call_s = time.time() - t0
    meta = B.read_entry(plan.entry, plan.key)

    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out)
    tp = torch.cat(parts, dim=1)  # (B, Hq, D): heads back in their original order
    sync()

    report = {
        "rank": rank, "pid": os.getpid(), "mode": "dryrun" if dry else "real",
        "device": str(device), "backend": dist.get_backend(),
        "device_name": torch.cuda.get_device_name(device) if not dry else "cpu",
        "current_device": torch.cuda.current_device() if not dry else None,
        "cache_root": str(root), "spec": spec.name, "arch": arch, "entry": plan.entry.name,
        "key": plan.key, "published_before_call": published_before, "compiles": compiles,
        "meta_after": None if meta is None else {k: meta.get(k) for k in
                                                 ("key", "sha256", "created", "host", "name")},
        "first_call_s": round(first_call_s, 3),
    }

    if rank == 0:
        # The same work on this GPU alone: the whole layer in one call, and every rank's shard call.
        q, k, v, table, lens = layer
        full = attn(q, k, v, table, lens)
        shards = torch.cat([attn(*shard(layer, r, world)) for r in range(world)], dim=1)
        ref = xqa_reference(q, k, v, table, lens)
        sync()
        report["split_plan_full"] = None if dry else split_plan_of(q)
        report["split_plan_shard"] = None if dry else split_plan_of(mine[0])
        torch.save({"tp": tp.cpu(), "single_full": full.cpu(), "single_shards": shards.cpu(),
                    "ref": ref.float().cpu(), "rank0_out": out.cpu()},
                   os.path.join(out_dir, "rank0.pt"))

    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(out_dir, f"rank{rank}.json.tmp"), os.path.join(out_dir, f"rank{rank}.json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True, help="directory for rank<r>.json / rank0.pt")
    ap.add_argument("--timeout", type=float, default=240.0, help="collective timeout, seconds")
    args = ap.parse_args(argv)
    try:
        run(args)
    except BaseException:  # noqa: BLE001 - report everything, then leave without NCCL teardown
        sys.stderr.write(f"[rank {args.rank}] FAILED:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)  # a blocked collective must not keep the process alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
