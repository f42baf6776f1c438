"""xqa_jit under torch.compile and CUDA graphs, and its behaviour on bad device-side values.

CPU part (runs everywhere; ``test_ops_*``): the custom ops of xqa_jit/ops.py are checked with the
eager kernels replaced by the PyTorch reference (``xqa_jit.api.xqa`` / ``xqa_mla`` monkeypatched):
schemas, ``torch.library.opcheck`` (schema / fake / AOT-dispatch consistency),
``torch.compile(fullgraph=True)`` with a graph counter, the fake implementations on fake CUDA
tensors, and that ``import xqa_jit`` does not import ops.py.

GPU part (skipped without CUDA):
- torch.compile(fullgraph=True) of functions calling xqa_jit.xqa (plain, return_lse, FP8 with tensor
  scales changed between calls, out=, inputs produced by Inductor, mode="reduce-overhead") and
  xqa_jit.xqa_mla: same results as eager and as the reference, one graph, no recompiles on new values.
- a decode step captured in a torch.cuda.CUDAGraph over fixed buffers; seq_lens, page_table, cache
  contents, q and the k/v scale tensors are then changed in place and the graph replayed: results
  equal eager xqa on the new values and the reference. One case is batch 1 at 20000 tokens (split-KV:
  partial results go through the per-stream workspace), one replays lengths 0 and 1 in a graph
  captured at full length, one is FP8 with per-head scale tensors, one uses RoPE (its table is made
  before capture).
- XQA_JIT_DEBUG=1 turns an out-of-pool page id or a seq_len above the page table's capacity into an
  IndexError naming the request (and the next call works); without it the same inputs neither crash
  nor corrupt the other requests of the batch (synchronize, finite output, valid requests exact).

Tolerances: as tests/test_decode_gpu.py and tests/test_variants_gpu.py (see there for the why): out vs
the float64 reference atol=rtol=5e-3 and norm 2e-3 (fp16), 3e-2 / 1e-2 (bf16), FP8 norm 5e-3 with
bf16 q; compiled / replayed vs eager: the same kernel on the same inputs, compared at 1e-3 (fp16) /
1e-2 (bf16), far below any indexing or scaling error.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import xqa_jit
from helpers import (
    BF16, E4M3, F16, assert_attn_close, assert_lse_close, dequantize, make_paged_kv,
    make_q, rand_uniform, randn, requires_gpu,
)
from xqa_jit import api as _api
from xqa_jit.reference import mla_reference, xqa_reference

TOL = {
    F16: dict(atol=5e-3, rtol=5e-3, max_rel=2e-3),
    BF16: dict(atol=3e-2, rtol=3e-2, max_rel=1e-2),
}
LSE_ATOL = {F16: 1e-3, BF16: 5e-3}
SAME = {F16: dict(atol=1e-3, rtol=1e-3), BF16: dict(atol=1e-2, rtol=1e-2)}
DEV = "cuda"


def _ops():
    from xqa_jit import ops

    return ops


# =============================================================================================
# CPU: the custom ops with the reference standing in for the kernels
# =============================================================================================


def _ref_xqa(q, k_cache, v_cache, page_table, seq_lens, head_dim=None, page_size=None,
             num_kv_heads=None, *, out=None, return_lse=False, **kw):
    o, lse = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size,
                           num_kv_heads, return_lse=True, **kw)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out.copy_(o)
    return (out, lse.contiguous()) if return_lse else out


def _ref_mla(q, kv_cache, page_table, seq_lens, head_dim=None, page_size=None, num_kv_heads=None,
             *, v_head_dim=None, sm_scale=None, kv_scale=None, out=None, return_lse=False):
    o, lse = mla_reference(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                           v_head_dim=v_head_dim, sm_scale=sm_scale, kv_scale=kv_scale,
                           return_lse=True)
    if out is None:
        out = torch.empty(o.shape, dtype=q.dtype, device=q.device)
    out.copy_(o)
    return (out, lse.contiguous()) if return_lse else out


@pytest.fixture
def ref_kernels(monkeypatch):
    """The ops' real implementations reach the reference instead of CUDA kernels (CPU tensors)."""
    monkeypatch.setattr(_api, "xqa", _ref_xqa)
    monkeypatch.setattr(_api, "xqa_mla", _ref_mla)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cpu_inputs(gen, *, b=3, hq=8, hkv=2, d=128, p=16, kv_dtype=F16, lq=None):
    lens = [0, 40, 70][:b] if b <= 3 else [int(x) for x in torch.randint(0, 90, (b,), generator=gen)]
    kv = make_paged_kv(b, hkv, d, p, lens, kv_dtype, "NHD", "cpu", gen=gen)
    q = make_q(b, hq, d, F16, gen, lq=lq, device="cpu")
    return q, kv


def test_ops_import_is_lazy():
    code = "import sys, xqa_jit; assert 'xqa_jit.ops' not in sys.modules, 'ops imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ops_schemas():
    _ops()
    for name in ("xqa", "xqa_out", "xqa_mla", "xqa_mla_out"):
        schema = getattr(torch.ops.xqa_jit, name).default._schema
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert writes == (["out"] if name.endswith("_out") else []), (name, str(schema))
        assert all(r.alias_info is None for r in schema.returns), str(schema)


def _op_args(q, kv, *, ks=(None, None), vs=(None, None), kvs=(None, None), sinks=None,
             spec_mask=None, sm_scale=None, window=-1, return_lse=True):
    return (q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, None, None, None, "NHD", sm_scale,
            "NONE", 1.0, 1e4, window, sinks, ks[0], ks[1], vs[0], vs[1], kvs[0], kvs[1], spec_mask,
            return_lse)


def test_ops_opcheck(ref_kernels, gen):
    _ops()
    q, kv = _cpu_inputs(gen)
    kf = _cpu_inputs(gen, kv_dtype=E4M3)[1]
    # opcheck's schema test cannot compare FP8 tensors on the CPU: FP8 cases skip it
    all_utils = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")
    no_schema = all_utils[1:]
    cases = [
        (_op_args(q, kv), all_utils),
        (_op_args(q, kv, return_lse=False, sm_scale=0.07, window=20), all_utils),
        (_op_args(q, kv, sinks=torch.randn(8, generator=gen)), all_utils),
        (_op_args(q, kf, ks=(torch.tensor([0.5, 2.0]), None), vs=(None, 0.25)), no_schema),
        (_op_args(q, kf, kvs=(torch.tensor([0.75]), None), return_lse=False), no_schema),
    ]
    for args, utils in cases:
        torch.library.opcheck(torch.ops.xqa_jit.xqa.default, args, test_utils=utils)
        torch.library.opcheck(torch.ops.xqa_jit.xqa_out.default, (torch.empty_like(q),) + args,
                              test_utils=utils)
    kvc = randn((kv.k_cache.shape[0], 16, 1, 256), gen, dtype=F16)
    margs = (q, kvc, kv.page_table, kv.seq_lens, None, None, None, None, 0.1, None, None, True)
    torch.library.opcheck(torch.ops.xqa_jit.xqa_mla.default, margs)
    torch.library.opcheck(torch.ops.xqa_jit.xqa_mla_out.default, (torch.empty_like(q),) + margs)
    margs = (q, kvc, kv.page_table, kv.seq_lens, None, None, None, 128, None, None, 0.5, False)
    torch.library.opcheck(torch.ops.xqa_jit.xqa_mla.default, margs)


def test_ops_fake_on_fake_cuda():
    """The fake implementations give out/lse shapes and dtypes on (fake) CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _ops()
    with FakeTensorMode():
        q = torch.empty(2, 8, 128, dtype=BF16, device="cuda")
        q4 = torch.empty(2, 5, 8, 128, dtype=BF16, device="cuda")
        k = torch.empty(9, 16, 2, 128, dtype=E4M3, device="cuda")
        pt = torch.empty(2, 4, dtype=torch.int32, device="cuda")
        sl = torch.empty(2, dtype=torch.int32, device="cuda")
        ks = torch.empty(2, dtype=torch.float32, device="cuda")
        rest = (None, None, None, "NHD", None, "NONE", 1.0, 1e4, -1, None, ks, 0.5, None)
        o, lse = ops.xqa_op_call(q, k, k, pt, sl, *rest, None, None, True)
        assert (o.shape, o.dtype, o.device.type) == (q.shape, BF16, "cuda")
        assert (lse.shape, lse.dtype) == ((2, 8), torch.float32)
        o = ops.xqa_op_call(q4, k, k, pt, sl, *rest, None, None, False)
        assert o.shape == q4.shape
        o, lse = ops.xqa_op_call(q4, k, k, pt, sl, *rest, None, torch.empty_like(q4), True)
        assert lse.shape == (2, 5, 8)
        lat = torch.empty(9, 16, 576, dtype=BF16, device="cuda")
        qm = torch.empty(2, 16, 576, dtype=BF16, device="cuda")
        o, lse = ops.xqa_mla_op_call(qm, lat, pt, sl, None, None, None, None, 0.1, None, None, True)
        assert (o.shape, lse.shape) == ((2, 16, 512), (2, 16))
        kvs = torch.empty(9, 16, 1, 256, dtype=BF16, device="cuda")
        o = ops.xqa_mla_op_call(q, kvs, pt, sl, None, None, None, None, None, None, None, False)
        assert o.shape == (2, 8, 128)


def _count_compiles(fn, backend="aot_eager", **kw):
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=cnt, fullgraph=True, **kw), cnt


def test_ops_compile_fullgraph_cpu(ref_kernels, gen):
    """fullgraph compile through the ops (reference behind them): same values as the eager path, out=
    written in place, float and tensor scales, one graph, no recompile when tensor values change."""
    q, kv = _cpu_inputs(gen)
    _, kf = _cpu_inputs(gen, kv_dtype=E4M3)
    ks = torch.tensor([0.5, 1.5])

    def step(x, k, v, pt, sl, kf, vf, ks, buf):
        qq = x * 2
        o1 = xqa_jit.xqa(qq, k, v, pt, sl, sm_scale=0.05)
        o2, lse2 = xqa_jit.xqa(qq, kf, vf, pt, sl, k_scale=ks, v_scale=0.5, return_lse=True,
                               sliding_window_size=16)
        o3 = xqa_jit.xqa(qq, k, v, pt, sl, out=buf)
        return o1.float() + 1, o2, lse2, o3

    def eager(x, k, v, pt, sl, kf, vf, ks, buf):
        qq = x * 2
        o1 = _ref_xqa(qq, k, v, pt, sl, sm_scale=0.05)
        o2, lse2 = _ref_xqa(qq, kf, vf, pt, sl, k_scale=ks, v_scale=0.5, return_lse=True,
                            sliding_window_size=16)
        o3 = _ref_xqa(qq, k, v, pt, sl, out=buf)
        return o1.float() + 1, o2, lse2, o3

    cstep, cnt = _count_compiles(step)
    for it in range(2):
        buf_c, buf_e = torch.zeros_like(q), torch.zeros_like(q)
        args = (q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, kf.k_cache, kf.v_cache, ks)
        got = cstep(*args, buf_c)
        want = eager(*args, buf_e)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True)
        assert got[3] is buf_c and buf_c.abs().sum() > 0
        ks.mul_(1.7)  # new tensor values: same graph
        kv.seq_lens[1] -= 3
    assert cnt.frame_count == 1, f"{cnt.frame_count} graphs compiled"


def test_ops_compile_mla_cpu(ref_kernels, gen):
    q, kv = _cpu_inputs(gen)
    kvc = randn((kv.k_cache.shape[0], 16, 2, 256), gen, dtype=F16)

    def step(q, kvc, pt, sl, buf):
        o, lse = xqa_jit.xqa_mla(q, kvc, pt, sl, sm_scale=0.1, return_lse=True)
        o2 = xqa_jit.xqa_mla(q, kvc, pt, sl, v_head_dim=128, out=buf)
        return o, lse, o2

    cstep, cnt = _count_compiles(step)
    buf = torch.zeros_like(q)
    o, lse, o2 = cstep(q, kvc, kv.page_table, kv.seq_lens, buf)
    ro, rlse = _ref_mla(q, kvc, kv.page_table, kv.seq_lens, sm_scale=0.1, return_lse=True)
    torch.testing.assert_close(o, ro, atol=0, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=0, rtol=0)
    assert o2 is buf
    torch.testing.assert_close(buf, _ref_mla(q, kvc, kv.page_table, kv.seq_lens), atol=0, rtol=0)
    assert cnt.frame_count == 1


def test_ops_compile_dynamic_batch_cpu(ref_kernels, gen):
    q, kv = _cpu_inputs(gen, b=6)

    def step(q, k, v, pt, sl):
        return xqa_jit.xqa(q, k, v, pt, sl, return_lse=True)

    cstep, cnt = _count_compiles(step, dynamic=True)
    first = None
    for b in (6, 4, 5):
        qb, ptb, slb = q[:b].clone(), kv.page_table[:b].clone(), kv.seq_lens[:b].clone()
        got = cstep(qb, kv.k_cache, kv.v_cache, ptb, slb)
        want = _ref_xqa(qb, kv.k_cache, kv.v_cache, ptb, slb, return_lse=True)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        # (the first compile may count twice: with dynamic=True Dynamo first traces xqa's float
        # defaults as symbolic floats, then restarts with them specialised; no recompile after)
        first = cnt.frame_count if first is None else first
    assert cnt.frame_count == first, "recompiled for a new batch size"


# =============================================================================================
# GPU: torch.compile
# =============================================================================================


def _gpu_problem(gen, *, q_dtype=F16, kv_dtype=None, b=4, hkv=2, group=4, d=128, p=16, layout="NHD",
                 lens=None):
    lens = lens or [0, 1, 300, 1000][:b]
    kv = make_paged_kv(b, hkv, d, p, lens, kv_dtype or q_dtype, layout, DEV, gen=gen)
    q = make_q(b, hkv * group, d, q_dtype, gen, device=DEV)
    return q, kv


def _check_ref(out, lse, q, kv, *, layout="NHD", dequant=None, msg="", **kw):
    k, v = kv.k_cache, kv.v_cache
    if dequant is not None:
        k, v = dequantize(k, dequant[0], layout), dequantize(v, dequant[1], layout)
    ref, rlse = xqa_reference(q, k, v, kv.page_table, kv.seq_lens, kv_layout=layout, return_lse=True, **kw)
    tol = dict(TOL[q.dtype])
    if dequant is not None and q.dtype == BF16:
        tol["max_rel"] = 5e-3
    assert_attn_close(out, ref, msg=msg, **tol)
    if lse is not None:
        assert_lse_close(lse, rlse, atol=LSE_ATOL[q.dtype], msg=msg)


@requires_gpu
def test_compile_fullgraph_matches_eager(gen):
    q, kv = _gpu_problem(gen)
    x = (q.float() / 2).contiguous()

    def step(x, k, v, pt, sl):
        qq = (x * 2).to(F16)  # q produced by Inductor
        o = xqa_jit.xqa(qq, k, v, pt, sl, sm_scale=0.06)
        return o.float() * 3

    cstep, cnt = _count_compiles(step, backend="inductor")
    args = (x, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens)
    got = cstep(*args)
    torch.testing.assert_close(got, step(*args), **SAME[F16])
    _check_ref(got / 3, None, q, kv, sm_scale=0.06, msg="compiled")
    # new values only (each length within the pages its request owns): no recompile
    kv.seq_lens.copy_(torch.tensor([0, 1, 17, 999], dtype=torch.int32))
    got = cstep(*args)
    torch.testing.assert_close(got, step(*args), **SAME[F16])
    assert cnt.frame_count == 1


@requires_gpu
def test_compile_return_lse_and_out(gen):
    q, kv = _gpu_problem(gen, q_dtype=BF16, group=8, layout="HND", p=64)

    def step(q, k, v, pt, sl, buf):
        o, lse = xqa_jit.xqa(q, k, v, pt, sl, kv_layout="HND", return_lse=True)
        o2 = xqa_jit.xqa(q, k, v, pt, sl, kv_layout="HND", out=buf)
        return o, lse, o2

    cstep, cnt = _count_compiles(step, backend="inductor")
    buf = torch.zeros_like(q)
    o, lse, o2 = cstep(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, buf)
    assert o2 is buf
    eo, e_lse = xqa_jit.xqa(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, kv_layout="HND",
                           return_lse=True)
    torch.testing.assert_close(o, eo, **SAME[BF16])
    torch.testing.assert_close(buf, eo, **SAME[BF16])
    torch.testing.assert_close(lse, e_lse, atol=1e-4, rtol=0)
    _check_ref(o, lse, q, kv, layout="HND", msg="compiled lse")
    assert cnt.frame_count == 1


@requires_gpu
def test_compile_fp8_tensor_scales(gen):
    q, kv = _gpu_problem(gen, q_dtype=BF16, kv_dtype=E4M3, group=8, lens=[7, 2000, 0, 333])
    ks = rand_uniform((2,), gen, 0.4, 1.6, DEV)
    vs = torch.tensor([0.8], device=DEV)

    def step(q, k, v, pt, sl, ks, vs):
        return xqa_jit.xqa(q, k, v, pt, sl, k_scale=ks, v_scale=vs, return_lse=True)

    cstep, cnt = _count_compiles(step, backend="inductor")
    for it in range(3):
        o, lse = cstep(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, ks, vs)
        eo, e_lse = step(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, ks, vs)
        torch.testing.assert_close(o, eo, **SAME[BF16])
        _check_ref(o, lse, q, kv, dequant=(ks, vs), msg=f"fp8 iteration {it}")
        ks.mul_(1.3)
        vs.fill_(0.5 + it)
    assert cnt.frame_count == 1


@requires_gpu
def test_compile_reduce_overhead(gen):
    """mode="reduce-overhead" (Inductor's CUDA graphs) with new lengths and tables each step."""
    q, kv = _gpu_problem(gen, lens=[1200, 1200, 1200, 1200])
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def step(q, k, v, pt, sl):
        o, lse = xqa_jit.xqa(q, k, v, pt, sl, return_lse=True)
        return o.clone(), lse.clone()

    for it, lens in enumerate([[1200, 3, 0, 600], [17, 1200, 1199, 1], [256, 512, 64, 1000]]):
        kv.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(make_q(4, 8, 128, F16, gen, device=DEV))
        o, lse = step(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens)
        _check_ref(o, lse, q, kv, msg=f"reduce-overhead step {it} lens={lens}")


@requires_gpu
def test_compile_mla_seed_form(gen):
    lens = [0, 5, 700]
    kv = make_paged_kv(3, 2, 128, 16, lens, F16, "NHD", DEV, gen=gen, dv=128)
    pool = randn((kv.k_cache.shape[0], 16, 2, 256), gen, dtype=F16, device=DEV)
    q = make_q(3, 8, 128, F16, gen, device=DEV)

    def step(q, kvc, pt, sl):
        return xqa_jit.xqa_mla(q, kvc, pt, sl, sm_scale=0.08, return_lse=True)

    cstep, cnt = _count_compiles(step, backend="inductor")
    o, lse = cstep(q, pool, kv.page_table, kv.seq_lens)
    ro, rlse = mla_reference(q, pool, kv.page_table, kv.seq_lens, sm_scale=0.08, return_lse=True)
    assert_attn_close(o, ro, msg="mla compiled", **TOL[F16])
    assert_lse_close(lse, rlse, atol=LSE_ATOL[F16], msg="mla compiled")
    assert cnt.frame_count == 1


@requires_gpu
def test_opcheck_real_kernels(gen):
    q, kv = _gpu_problem(gen)
    _ops()
    args = _op_args(q, kv)
    torch.library.opcheck(torch.ops.xqa_jit.xqa.default, args)
    torch.library.opcheck(torch.ops.xqa_jit.xqa_out.default, (torch.empty_like(q),) + args)


# =============================================================================================
# GPU: CUDA graph capture and replay on new values
# =============================================================================================


def _fresh_table(b, m, n, p, lens, gen):
    """A new (b, m) page table over the same n-page pool: random distinct pages, garbage after."""
    need = [-(-int(x) // p) for x in lens]
    assert sum(need) <= n and max(need) <= m, (need, n, m)
    perm = torch.randperm(n, generator=gen)
    table = torch.randint(-2**31, 2**31 - 1, (b, m), generator=gen)
    off = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[off:off + k]
        off += k
    return table.to(torch.int32)


GRAPH_CASES = {
    # name: (q dtype, kv dtype, Hkv, group, P, layout, capacity lens, [lens per replay], extra kw)
    "fp16_rope_batch": (F16, F16, 2, 4, 16, "NHD", [1500] * 5,
                        [[0, 1, 300, 1000, 777], [513, 0, 1500, 17, 1]],
                        dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5)),
    "long_split_kv": (F16, F16, 2, 4, 16, "NHD", [20000], [[20000], [15001], [1], [0]], {}),
    "fp8_tensor_scales": (BF16, E4M3, 2, 8, 64, "HND", [3000] * 3,
                          [[3000, 1, 1234], [0, 2999, 65]], dict(scales=True)),
}


@requires_gpu
@pytest.mark.parametrize("name", list(GRAPH_CASES))
def test_cuda_graph_replay_new_values(gen, name, set_debug):
    set_debug(False)  # debug mode synchronises: not capturable
    qd, kvd, hkv, group, p, layout, cap_lens, rounds, extra = GRAPH_CASES[name]
    extra = dict(extra)
    scales = extra.pop("scales", False)
    b = len(cap_lens)
    kv = make_paged_kv(b, hkv, 128, p, cap_lens, kvd, layout, DEV, gen=gen)
    n, m = kv.k_cache.shape[0], kv.page_table.shape[1]
    q = make_q(b, hkv * group, 128, qd, gen, device=DEV)
    out = torch.empty_like(q)
    kw = dict(kv_layout=layout, **extra)
    if scales:
        kw["k_scale"] = rand_uniform((hkv,), gen, 0.4, 1.6, DEV)
        kw["v_scale"] = torch.tensor([0.7], device=DEV)
    args = (q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens)

    # warm up (builds the kernel, the rope table, the split plan) off the default stream, then capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        xqa_jit.xqa(*args, out=out, return_lse=True, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        g_out, g_lse = xqa_jit.xqa(*args, out=out, return_lse=True, **kw)
    assert g_out is out

    for r, lens in enumerate(rounds):
        # new values in the captured buffers: lengths, a reshuffled page table, cache, q, scales
        kv.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        kv.page_table.copy_(_fresh_table(b, m, n, p, lens, gen))
        kv.k_cache.copy_(randn(kv.k_cache.shape, gen, dtype=kvd, device=DEV))
        kv.v_cache.copy_(randn(kv.v_cache.shape, gen, dtype=kvd, device=DEV))
        q.copy_(make_q(b, hkv * group, 128, qd, gen, device=DEV))
        if scales:
            kw["k_scale"].copy_(rand_uniform((hkv,), gen, 0.4, 1.6, DEV))
            kw["v_scale"].fill_(0.5 + 0.3 * r)
        g.replay()
        torch.cuda.synchronize()
        msg = f"{name} replay {r} lens={lens}"
        e_out, e_lse = xqa_jit.xqa(*args, return_lse=True, **kw)
        torch.testing.assert_close(g_out, e_out, **SAME[qd], msg=lambda s: f"{msg}: {s}")
        torch.testing.assert_close(g_lse, e_lse, atol=1e-3, rtol=0, equal_nan=False,
                                   msg=lambda s: f"{msg} (lse): {s}")
        ref_kw = {k: v for k, v in kw.items() if k not in ("k_scale", "v_scale", "kv_layout")}
        _check_ref(g_out, g_lse, q, kv, layout=layout,
                   dequant=(kw["k_scale"], kw["v_scale"]) if scales else None, msg=msg, **ref_kw)
        for i, L in enumerate(lens):
            if L == 0:
                assert not g_out[i].any(), f"{msg}: request {i} has length 0 but non-zero output"
                assert torch.isneginf(g_lse[i]).all(), f"{msg}: request {i} lse != -inf"


# =============================================================================================
# GPU: bad values that live on the device
# =============================================================================================


def _refresh_env():
    refresh = getattr(_api, "refresh_env", None)  # XQA_JIT_DEBUG is read once, then memoized
    if refresh is not None:
        refresh()


@pytest.fixture
def set_debug(monkeypatch):
    """set_debug(True/False): XQA_JIT_DEBUG for this test only (restored, and re-read, after)."""

    def set_(on: bool):
        if on:
            monkeypatch.setenv("XQA_JIT_DEBUG", "1")
        else:
            monkeypatch.delenv("XQA_JIT_DEBUG", raising=False)
        _refresh_env()

    yield set_
    monkeypatch.undo()
    _refresh_env()


def _bad_value_batch(gen):
    """4 requests: 0 valid, 1 with an out-of-pool page id, 2 with a length above capacity (M * P),
    3 with a negative page id. Returns (q, kv, capacity)."""
    lens = [500, 400, 300, 200]
    kv = make_paged_kv(4, 2, 128, 16, lens, F16, "NHD", DEV, gen=gen, extra_cols=0)
    n, m = kv.k_cache.shape[0], kv.page_table.shape[1]
    cap = m * 16
    q = make_q(4, 8, 128, F16, gen, device=DEV)
    return q, kv, n, cap


@requires_gpu
def test_debug_mode_names_bad_request(gen, set_debug):
    set_debug(True)
    q, kv, n, cap = _bad_value_batch(gen)
    good_pt, good_sl = kv.page_table.clone(), kv.seq_lens.clone()

    kv.page_table[1, 3] = n + 7
    with pytest.raises(IndexError, match=rf"page_table\[1, 3\] = {n + 7} is outside the page pool"):
        xqa_jit.xqa(q, *kv)
    kv.page_table.copy_(good_pt)
    kv.page_table[3, 0] = -1
    with pytest.raises(IndexError, match=r"page_table\[3, 0\] = -1 is outside the page pool"):
        xqa_jit.xqa(q, *kv)
    kv.page_table.copy_(good_pt)
    kv.seq_lens[2] = cap + 5
    with pytest.raises(IndexError, match=rf"seq_lens\[2\] = {cap + 5} exceeds .* capacity .* = {cap}"):
        xqa_jit.xqa(q, *kv)
    # the next valid call works and is right (no sticky error)
    kv.seq_lens.copy_(good_sl)
    out, lse = xqa_jit.xqa(q, *kv, return_lse=True)
    torch.cuda.synchronize()
    _check_ref(out, lse, q, kv, msg="debug mode, valid after errors")


@requires_gpu
def test_bad_values_without_debug_do_not_crash(gen, set_debug):
    set_debug(False)
    q, kv, n, cap = _bad_value_batch(gen)
    ref0, ref0_lse = xqa_reference(q[:1], kv.k_cache, kv.v_cache, kv.page_table[:1], kv.seq_lens[:1],
                                   return_lse=True)
    kv.page_table[1, 3] = n + 7
    kv.page_table[1, 5] = 2**31 - 1
    kv.seq_lens[2] = cap + 5
    kv.page_table[3, 0] = -1
    for lens_3 in (200, -5):  # a negative length too
        kv.seq_lens[3] = lens_3
        out, lse = xqa_jit.xqa(q, *kv, return_lse=True)
        torch.cuda.synchronize()  # an illegal address would surface here
        assert torch.isfinite(out).all(), "non-finite output for bad device-side values"
        assert not torch.isnan(lse).any()
        assert_attn_close(out[:1], ref0, msg="valid request next to bad ones", **TOL[F16])
        assert_lse_close(lse[:1], ref0_lse, atol=LSE_ATOL[F16], msg="valid request next to bad ones")
    # still healthy
    good = make_paged_kv(2, 2, 128, 16, [100, 3000], F16, "NHD", DEV, gen=gen)
    q2 = make_q(2, 8, 128, F16, gen, device=DEV)
    out, lse = xqa_jit.xqa(q2, *good, return_lse=True)
    torch.cuda.synchronize()
    _check_ref(out, lse, q2, good, msg="after bad values")
