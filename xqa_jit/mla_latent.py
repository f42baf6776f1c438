"""Latent-form MLA decode (DeepSeek-V2/V3): argument checks, split plan, workspace, launch.

q (B, Hq, 576) = [absorbed q_nope (512) | q_pe (64)]; kv_cache (N, P, 576) or (N, P, 1, 576) =
[c_kv (512) | k_pe (64)]; keys are the whole row, values its first 512 elements; out (B, Hq, 512).
The kernels are templates/mla.cu.jinja (v1), mla2.cu.jinja (v2), mla3.cu.jinja (v3) and the
experimental mla4.cu.jinja (v4, only when asked for),
chosen by spec.mla_impl_for (see set_impl). As in api.py, every check here runs on the host from shapes,
dtypes, strides and devices only: nothing reads GPU memory, so a call stays asynchronous and
capturable in a CUDA graph. Bad page ids and over-long seq_lens are clamped in the kernel; with
XQA_JIT_DEBUG=1 the kernel reports the first one and this module raises.
"""
from __future__ import annotations

import math
import os
import struct

import torch

from . import build as _build
from .api import (
    _check_aligned,
    _check_paging,
    _launch,
    _dev_index,
    _fail,
    _occupancy,
    _raise_device_error,
    _scale_arg,
    _sm_count,
    _workspace,
)
from .spec import MlaSpec, SpecError, mla_impl_for

QK_DIM = 576
V_DIM = 512
HEADS = (16, 32, 64, 128)
_Q_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# Must match `struct Params` in templates/mla.cu.jinja: 11 pointers and 14 int64, then 2 doubles.
_PARAMS = struct.Struct("<25q2d")

# Split-KV policy. A latent block's partial result is 64 heads x 512 fp32 (128 KiB), and the last
# block of a request merges all of its splits alone, so the merge costs about as much as
# MERGE_TOKENS tokens of attention per split: with W tokens per request the best split count is
# near sqrt(W / MERGE_TOKENS), and more splits than that only help when the GPU would otherwise sit
# idle. Splits never go below MIN_CHUNK tokens. Within that bound the split count is the one whose
# waves x tiles per block (the time of the SM that runs the most tiles, all requests span-long) is
# least, the fewest splits on a tie; a span over 2 MAX_CHUNK tokens is cut into chunks of at most
# MAX_CHUNK, so that one long request among short ones is spread over several SMs (the plan sees
# shapes only: the page table's capacity, not seq_lens).
MIN_CHUNK = int(os.environ.get("XQA_JIT_MLA_MIN_CHUNK", "128"))
MERGE_TOKENS = int(os.environ.get("XQA_JIT_MLA_MERGE_TOKENS", "32"))
MAX_CHUNK = int(os.environ.get("XQA_JIT_MLA_MAX_CHUNK", "2048"))

_SPECS: dict = {}
_PLANS: dict = {}


IMPLS = ("auto", "v1", "v2", "v3", "v4")
_IMPL: list = [None]  # set_impl() override; None: $XQA_JIT_MLA_IMPL, default auto


def set_impl(impl: str | None) -> None:
    """Select the latent kernel for later calls: "auto" (spec.mla_impl_for: on sm_90a v3 for
    pages of 8+ tokens (any head count, 16-bit or FP8 cache), v2 for smaller pages with 64+ heads
    or an FP8 cache with 32+ heads, else v1), "v3" (templates/mla3.cu.jinja, wgmma + TMA), "v1"
    (templates/mla.cu.jinja, mma.sync), "v2" (templates/mla2.cu.jinja, wgmma, sm_90a), "v4"
    (templates/mla4.cu.jinja, experimental: 128 heads, 16-bit cache, a two-block cluster per
    request, no split-KV; slower than v3 so far), or None to follow $XQA_JIT_MLA_IMPL (default
    auto)."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"xqa_mla: unknown latent kernel implementation {impl!r}; "
                         f"expected one of {sorted(IMPLS)}")
    _IMPL[0] = impl


def current_impl() -> str:
    """The implementation the next call uses (read at call time, not import time)."""
    impl = _IMPL[0] or os.environ.get("XQA_JIT_MLA_IMPL", "").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"xqa_mla: XQA_JIT_MLA_IMPL={impl!r} is not one of {sorted(IMPLS)}")
    return impl


def _split_plan(mod, dev: int, units: int, span: int):
    """(splits, chunk tokens) for `units` (request, head group) pairs whose key span is at most
    `span` tokens. Shapes only, so a captured CUDA graph stays valid."""
    key = (id(mod), dev, units, span)
    pl = _PLANS.get(key)
    if pl is not None:
        return pl
    info = mod.info
    tile = info["tile_tokens"]
    max_splits = max(1, info["max_splits"])
    span = max(span, 1)
    target = _sm_count(dev) * _occupancy(mod, dev)
    splits = 1
    if units < 0.8 * target:  # a batch that fills most of one wave gains nothing from splitting
        fill = -(-target // units)                                 # splits to fill one wave
        merge = max(1, math.isqrt(span // max(MERGE_TOKENS, 1)))   # splits the merge can afford
        shortest = max(1, span // max(MIN_CHUNK, 1))               # splits of at least MIN_CHUNK
        upper = max(1, min(fill, merge, shortest, max_splits))
        tiles = -(-span // tile)

        def makespan(s):  # waves x tiles per block: 32 units of 8k take 4 splits (one wave of
            return -(-units * s // target) * -(-tiles // s)  # 32 tiles), not 5 (two waves of 26)

        splits = min(range(1, upper + 1), key=lambda s: (makespan(s), s))
        if span > 2 * MAX_CHUNK:
            splits = max(splits, min(-(-span // MAX_CHUNK), max_splits, shortest))
    chunk = -(-span // splits)
    chunk = -(-chunk // tile) * tile
    splits = -(-span // chunk)
    pl = _PLANS[key] = (splits, chunk)
    return pl


def _module(qt: str, kvt: str, hq: int, debug: bool, dev: int, impl: str = "auto",
            page_size: int = 64):
    key = (qt, kvt, hq, debug, dev, impl, page_size >= 8)
    mod = _SPECS.get(key)
    if mod is None:
        arch = _build.device_arch(dev)
        if impl == "auto":
            impl = mla_impl_for(hq, kvt, arch, page_size)
        elif impl in ("v3", "v4") and page_size < 8:
            raise ValueError(f"xqa_mla: the {impl} latent kernel needs page_size >= 8 (its copy engine "
                             f"boxes are 8+ rows), got page_size={page_size}; use "
                             f"XQA_JIT_MLA_IMPL=auto, v1 or v2")
        try:
            spec = MlaSpec(q_dtype=qt, kv_dtype=kvt, num_heads=hq, debug=debug, impl=impl)
        except SpecError as e:
            raise ValueError(str(e)) from None
        mod = _SPECS[key] = _build.get_module(spec, arch)
    return mod


def mla_latent(q, kv_cache, page_table, seq_lens, page_size=None, num_kv_heads=None,
               v_head_dim=None, sm_scale=None, kv_scale=None, out=None, return_lse=False):
    """Latent-form ``xqa_mla``: see the module docstring and API.md. Returns out (B, Hq, 512) in
    q's dtype, and with return_lse also lse (B, Hq) float32 (natural log; -inf where
    seq_lens[b] == 0, whose out rows are zeros)."""
    # ---------------------------------------------------------------- q
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, f"q must be a torch.Tensor, got {type(q).__name__}")
    qt = _Q_DTYPES.get(q.dtype)
    if qt is None:
        _fail(TypeError, f"xqa_mla: q must be float16 or bfloat16, got {q.dtype}")
    if not q.is_cuda:
        _fail(ValueError, f"xqa_mla: q must be a CUDA tensor, got device {q.device}")
    device = q.device
    if q.dim() != 3 or q.shape[-1] != QK_DIM:
        _fail(ValueError, f"xqa_mla: latent q must have shape (B, Hq, {QK_DIM}), got "
                          f"{tuple(q.shape)}")
    B, Hq, _ = q.shape
    if Hq not in HEADS:
        _fail(ValueError, f"xqa_mla: the latent kernel supports Hq (q.shape[1]) in {HEADS}, "
                          f"got {Hq}")
    if B < 1 or B > 65535:
        _fail(ValueError, f"xqa_mla: batch size (q.shape[0]) must be in 1..65535, got {B}")
    q_sb, q_sh, q_sd = q.stride()
    if q_sd != 1:
        _fail(ValueError, f"xqa_mla: q's last dimension must be contiguous (stride 1), got "
                          f"strides {q.stride()}")
    # ---------------------------------------------------------------- cache
    if not isinstance(kv_cache, torch.Tensor):
        _fail(TypeError, f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
    if kv_cache.device != device:
        _fail(ValueError, f"xqa_mla: kv_cache is on {kv_cache.device} but q is on {device}")
    if kv_cache.dtype == q.dtype:
        kvt = qt
    elif kv_cache.dtype == torch.float8_e4m3fn:
        kvt = "e4m3"
    else:
        _fail(TypeError, f"xqa_mla: kv_cache dtype must be q's dtype ({q.dtype}) or "
                         f"torch.float8_e4m3fn, got {kv_cache.dtype}")
    if kv_cache.dim() == 3:
        N, P, W = kv_cache.shape
        kv_sp, kv_ss, kv_sd = kv_cache.stride()
    elif kv_cache.dim() == 4:
        N, P, H1, W = kv_cache.shape
        if H1 != 1:
            _fail(ValueError, f"xqa_mla: a 4-D latent cache must be (N, P, 1, {QK_DIM}) (one "
                              f"shared latent head), got {tuple(kv_cache.shape)}")
        kv_sp, kv_ss, _, kv_sd = kv_cache.stride()
    else:
        _fail(ValueError, f"xqa_mla: latent kv_cache must be (N, P, {QK_DIM}) or "
                          f"(N, P, 1, {QK_DIM}), got {tuple(kv_cache.shape)}")
    if W != QK_DIM:
        _fail(ValueError, f"xqa_mla: latent kv_cache rows must have {QK_DIM} elements like q, "
                          f"got {tuple(kv_cache.shape)}")
    if kv_sd != 1:
        _fail(ValueError, f"xqa_mla: kv_cache's last dimension must be contiguous, got strides "
                          f"{kv_cache.stride()}")
    if page_size is not None and page_size != P:
        _fail(ValueError, f"xqa_mla: page_size={page_size} disagrees with kv_cache.shape[1]={P}")
    if P < 1 or P & (P - 1):
        _fail(ValueError, f"xqa_mla: page_size (kv_cache.shape[1]) must be a power of two, got {P}")
    if num_kv_heads is not None and num_kv_heads != 1:
        _fail(ValueError, f"xqa_mla: the latent cache has one shared head; num_kv_heads must be 1 "
                          f"or None, got {num_kv_heads}")
    if v_head_dim is not None and v_head_dim != V_DIM:
        _fail(ValueError, f"xqa_mla: for {QK_DIM}-wide latent rows v_head_dim must be {V_DIM} "
                          f"(values are the rows' first {V_DIM} elements), got {v_head_dim}")
    # ---------------------------------------------------------------- page table, lengths
    M = _check_paging(page_table, seq_lens, B, device, "xqa_mla: ")
    cap = M * P
    if cap >= 2**31:
        _fail(ValueError, f"xqa_mla: page_table capacity max_pages * page_size = {cap} exceeds "
                          f"2^31 tokens")
    # ---------------------------------------------------------------- scales
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(QK_DIM)
    ksf, ksp, _ = _scale_arg("kv_scale", kv_scale, 1, device)
    if min(q_sb, q_sh) <= 0:
        # a broadcast q (stride 0, e.g. from expand()): the v3 kernel copies q by a tensor map, whose
        # strides must be positive; a contiguous copy is cheap beside the attention itself
        q = q.contiguous()
        q_sb, q_sh, _ = q.stride()
    _check_aligned("q", q, (q_sb, q_sh), 2)
    _check_aligned("kv_cache", kv_cache, (kv_sp, kv_ss), kv_cache.element_size())
    # ---------------------------------------------------------------- outputs
    if out is None:
        out = torch.empty((B, Hq, V_DIM), dtype=q.dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != q.dtype:
            _fail(TypeError, f"xqa_mla: out must be a {q.dtype} tensor, got "
                             f"{getattr(out, 'dtype', type(out).__name__)}")
        if out.shape != (B, Hq, V_DIM):
            _fail(ValueError, f"xqa_mla: out must have shape (B, Hq, {V_DIM}) = "
                              f"{(B, Hq, V_DIM)}, got {tuple(out.shape)}")
        if out.device != device:
            _fail(ValueError, f"xqa_mla: out is on {out.device} but q is on {device}")
        if out.stride(-1) != 1:
            _fail(ValueError, f"xqa_mla: out's last dimension must be contiguous, got strides "
                              f"{out.stride()}")
        _check_aligned("out", out, out.stride()[:-1], 2)
    o_sb, o_sh, _ = out.stride()
    lse = None
    lse_ptr = 0
    if return_lse:
        lse = torch.empty((B, Hq), dtype=torch.float32, device=device)
        lse_ptr = lse.data_ptr()
    # ---------------------------------------------------------------- kernel, plan, launch
    dev = _dev_index(q)
    debug = _build._env_flag("XQA_JIT_DEBUG")
    mod = _module(qt, kvt, Hq, debug, dev, current_impl(), P)
    units = B * mod.info["row_chunks"]  # (request, head group) pairs
    splits, chunk = _split_plan(mod, dev, units, cap)
    stream = torch._C._cuda_getCurrentRawStream(dev)
    part_ptr = ml_ptr = cnt_ptr = 0
    if splits > 1:
        ws = _workspace(dev, stream)
        hg = mod.info["rows_per_block"]
        npart = units * splits
        part, cnt = ws.get(npart * hg * (V_DIM + 2), units, device)
        part_ptr = part.data_ptr()
        ml_ptr = part_ptr + npart * hg * V_DIM * 4
        cnt_ptr = cnt.data_ptr()
    err = None
    if debug:
        err = torch.zeros(4, dtype=torch.int32, device=device)
    params = _PARAMS.pack(
        q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), lse_ptr,
        page_table.data_ptr(), seq_lens.data_ptr(), ksp,
        part_ptr, ml_ptr, cnt_ptr, 0 if err is None else err.data_ptr(),
        B, M, N, P.bit_length() - 1, splits, chunk,
        q_sb, q_sh, o_sb, o_sh, kv_sp, kv_ss, page_table.stride(0), Hq,
        float(sm_scale), ksf)
    _launch(mod, params, stream, dev)
    if err is not None:
        _raise_device_error(err, "xqa_mla")
    return (out, lse) if return_lse else out
