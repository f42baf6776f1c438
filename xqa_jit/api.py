"""Public entry points: argument checks, spec from tensors, workspace, launch.

Every check here runs on the host from shapes, dtypes, strides and devices only: nothing reads GPU
memory, so a decode step stays asynchronous (and capturable in a CUDA graph). Values that live on
the GPU (seq_lens beyond the page table, page ids outside the pool) are clamped in the kernel; with
XQA_JIT_DEBUG=1 the kernel reports the first bad one and this module raises.
"""
from __future__ import annotations

import math
import numbers
import os
import struct
import threading

import torch

from . import build as _build
from .spec import DecodeSpec, SpecError

_Q_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_KV_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_POS_MODES = ("NONE", "ROPE_LLAMA")

# Must match `struct Params` in templates/decode.cu.jinja: 16 pointers, 30 int64 fields, 3 doubles.
# The pointers change every call; the rest is packed once per call signature.
_HEAD = struct.Struct("<16q")
_TAIL = struct.Struct("<30q3d")
_raw_stream = torch._C._cuda_getCurrentRawStream
_cur_device = torch._C._cuda_getDevice


def _launch(mod, params: bytes, stream: int, dev: int) -> None:
    """Launch `mod` on `dev`, the tensors' device. When it is not the current device, switch with
    torch's guard: restoring a device through plain cudaSetDevice would create a CUDA context
    (hundreds of MB) on a GPU this process never used, e.g. cuda:0 in a rank that owns cuda:1."""
    if dev == _cur_device():
        rc = mod.launch(params, stream, dev)
    else:
        with torch.cuda.device(dev):
            rc = mod.launch(params, stream, dev)
    if rc:
        raise RuntimeError(f"xqa_jit: launching {mod.spec.name} failed: CUDA error {rc} "
                           f"({_cuda_error_name(rc)})")


class _Plan:
    """What one call signature resolves to: kernel, split plan and the packed constant params."""

    __slots__ = ("mod", "dev", "debug", "splits", "invf_ptr", "lse_shape", "sink_fix",
                 "ks_tensor", "vs_tensor", "mask_fix", "units", "ws_floats", "ml_off", "tail")


def _upcast_sinks(t):
    return t.float().contiguous()


def _contiguous(t):
    return t.contiguous()


_ENV: dict = {}


def _debug() -> bool:
    """XQA_JIT_DEBUG, read at the first launch (call refresh_env() after changing it)."""
    v = _ENV.get("debug")
    if v is None:
        v = _ENV["debug"] = _build._env_flag("XQA_JIT_DEBUG")
    return v


def refresh_env() -> None:
    """Re-read XQA_JIT_DEBUG (it is read once, at the first launch, to keep launches cheap)."""
    _ENV.clear()

# Split-KV policy (see benchmarks/NOTES.md): fill the GPU with at least one wave of blocks, never cut
# a request into pieces shorter than MIN_CHUNK tokens, and bound any one block's work by MAX_CHUNK so
# one long request in a batch of short ones cannot become the tail.
MIN_CHUNK = 256
MAX_CHUNK = int(os.environ.get("XQA_JIT_MAX_CHUNK", "4096"))


def _fail(exc, msg):
    raise exc(msg)


def _is_device_ok(t: torch.Tensor) -> bool:
    """Whether q's device can run the kernels (CUDA). One hook, so CPU tests can reach every later check."""
    return t.is_cuda


def _dev_index(t: torch.Tensor) -> int:
    d = t.device
    return d.index if d.index is not None else torch.cuda.current_device()


_SM_COUNT: dict = {}


def _sm_count(dev: int) -> int:
    n = _SM_COUNT.get(dev)
    if n is None:
        n = _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n


_OCC: dict = {}


def _occupancy(mod, dev: int) -> int:
    key = (id(mod), dev)
    n = _OCC.get(key)
    if n is None:
        with torch.cuda.device(dev):
            n = _OCC[key] = max(1, mod.occupancy(dev))
    return n


_PLANS: dict = {}


def _split_plan(mod, dev: int, units: int, span: int):
    """(splits, chunk tokens) for `units` (request, KV head, row chunk) triples whose key span is at
    most `span` tokens. Depends on shapes only, so a captured CUDA graph stays valid.

    FlashAttention's rule: among split counts s, take the smallest whose wave efficiency
    (blocks / (waves * resident blocks)) is within 85% of the best; then bound each block's work by
    MAX_CHUNK tokens so that one long request among short ones cannot become the tail."""
    key = (id(mod), dev, units, span)
    pl = _PLANS.get(key)
    if pl is not None:
        return pl
    tile = mod.info["tile_tokens"]
    target = _sm_count(dev) * _occupancy(mod, dev)
    max_s = max(1, min(128, -(-span // MIN_CHUNK)))

    def eff(s):
        n = units * s
        return n / (-(-n // target) * target)

    best = max(eff(s) for s in range(1, max_s + 1))
    fill = next(s for s in range(1, max_s + 1) if eff(s) >= 0.85 * best)
    chunk = -(-max(span, 1) // fill)
    if span > 2 * MAX_CHUNK:  # only long contexts: uniform 8k requests run best unsplit (NOTES v4)
        chunk = min(chunk, max(MAX_CHUNK, MIN_CHUNK))
    chunk = -(-chunk // tile) * tile
    splits = max(1, -(-span // chunk))
    pl = _PLANS[key] = (splits, chunk)
    return pl


class _Workspace:
    """Per (device, stream) scratch for split-KV partials and the merge counters. It only grows;
    outgrown buffers are kept alive so a CUDA graph that captured their addresses stays valid."""

    __slots__ = ("part", "cnt", "old")

    def __init__(self):
        self.part = None
        self.cnt = None
        self.old = []

    def get(self, floats: int, counters: int, device):
        if (self.part is not None and self.part.numel() >= floats and self.cnt is not None
                and self.cnt.numel() >= counters):
            return self.part, self.cnt
        if torch.cuda.is_current_stream_capturing():
            self._grow(floats, counters, device)  # inside a capture: the graph's pool owns it
        else:
            # From a helper thread: CUDA-graph memory pools (torch.compile's reduce-overhead
            # warm-up routes the calling thread's allocations to its pool) must never own memory
            # that this module keeps alive across calls.
            err = []

            def grow():
                try:
                    self._grow(floats, counters, device)
                    torch.cuda.current_stream(device).synchronize()  # the zero fill is done
                except BaseException as e:  # surfaced in the calling thread
                    err.append(e)

            t = threading.Thread(target=grow, name="xqa_jit-workspace")
            t.start()
            t.join()
            if err:
                raise err[0]
        return self.part, self.cnt

    def _grow(self, floats, counters, device):
        if self.part is None or self.part.numel() < floats:
            if self.part is not None:
                self.old.append(self.part)
            self.part = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
        if self.cnt is None or self.cnt.numel() < counters:
            if self.cnt is not None:
                self.old.append(self.cnt)
            # zeroed once; each merge resets its counter to 0 for the next launch
            self.cnt = torch.zeros(max(counters, 1024), dtype=torch.int32, device=device)


_LAST_WS: dict = {}


def _workspace(dev: int, stream: int) -> _Workspace:
    """The split-KV scratch of (device, stream). Eager streams each get their own, so concurrent
    streams never share partials or counters. A stream being captured into a CUDA graph borrows
    the device's last eager workspace (its warm-up run: torch.cuda.graph and torch.compile's
    reduce-overhead both warm up eagerly first), so no scratch is allocated inside the graph's
    memory pool and kept alive by this module."""
    ws = _WS.get((dev, stream))
    if ws is None:
        if torch.cuda.is_current_stream_capturing():
            ws = _LAST_WS.get(dev)
        if ws is None:
            ws = _Workspace()
        _WS[(dev, stream)] = ws
    if _LAST_WS.get(dev) is not ws and not torch.cuda.is_current_stream_capturing():
        _LAST_WS[dev] = ws
    return ws


_WS: dict = {}


def _scale_arg(name, value, hkv, device):
    """(float multiplier, device pointer or 0, per-head flag) for k_scale / v_scale."""
    if value is None:
        return 1.0, 0, 0
    if isinstance(value, torch.Tensor):
        if value.device != device:
            _fail(ValueError, f"{name} must be on {device} like the caches, got {value.device}")
        if value.dtype != torch.float32:
            _fail(TypeError, f"{name} must be float32, got {value.dtype}")
        n = value.numel()
        if value.dim() > 1 or n not in (1, hkv):
            _fail(ValueError, f"{name} must have shape (1,) or (num_kv_heads,) = ({hkv},), got "
                              f"{tuple(value.shape)}")
        if value.dim() == 1 and value.stride(0) != 1 and n > 1:
            _fail(ValueError, f"{name} must be contiguous")
        return 1.0, value.data_ptr(), int(n == hkv and hkv > 1)
    try:
        return float(value), 0, 0
    except (TypeError, ValueError):
        _fail(TypeError, f"{name} must be a float or a float32 tensor, got {type(value).__name__}")


def _check_aligned(name, t, strides_elems, esize):
    if t.data_ptr() % 16:
        _fail(ValueError, f"{name} must start on a 16-byte boundary (data_ptr % 16 = "
                          f"{t.data_ptr() % 16}): 16-byte vector loads are used")
    for s in strides_elems:
        if (s * esize) % 16:
            _fail(ValueError, f"{name} strides {tuple(t.stride())} (elements of {esize} bytes) must be "
                              f"multiples of 16 bytes: 16-byte vector loads are used")


_SPECS: dict = {}


def _check_paging(page_table, seq_lens, B: int, device, who: str = "") -> int:
    """page_table (B, M) int32 and seq_lens (B,) int32 on q's device; returns M. `who` prefixes
    the messages (e.g. "xqa_mla: ")."""
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32:
        _fail(TypeError, f"{who}page_table must be an int32 tensor, got "
                         f"{getattr(page_table, 'dtype', type(page_table).__name__)}")
    if page_table.device != device:
        _fail(ValueError, f"{who}page_table is on {page_table.device} but q is on {device}")
    if page_table.dim() != 2 or page_table.shape[0] != B:
        _fail(ValueError, f"{who}page_table must have shape (batch={B}, max_pages), got "
                          f"{tuple(page_table.shape)}")
    M = page_table.shape[1]
    if M < 1 or page_table.stride(1) != 1:
        _fail(ValueError, f"{who}page_table must have at least one column and a contiguous last "
                          f"dim, got shape {tuple(page_table.shape)} strides {page_table.stride()}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype != torch.int32:
        _fail(TypeError, f"{who}seq_lens must be an int32 tensor, got "
                         f"{getattr(seq_lens, 'dtype', type(seq_lens).__name__)}")
    if seq_lens.device != device:
        _fail(ValueError, f"{who}seq_lens is on {seq_lens.device} but q is on {device}")
    if seq_lens.shape != (B,) or (B > 1 and seq_lens.stride(0) != 1):
        _fail(ValueError, f"{who}seq_lens must be a contiguous ({B},) tensor, got shape "
                          f"{tuple(seq_lens.shape)}")
    return M


def _tsig(t):
    return (t.shape, t.stride(), t.dtype, t.device)


def _ssig(x):
    return x if x is None or not isinstance(x, torch.Tensor) else _tsig(x)


_CALLS: dict = {}
_MAX_CALLS = 4096


def xqa(q, k_cache, v_cache, page_table, seq_lens, head_dim=None, page_size=None,
        num_kv_heads=None, *, kv_layout="NHD", sm_scale=None, pos_encoding_mode="NONE",
        rope_scale=1.0, rope_theta=1e4, sliding_window_size=-1, sinks=None, k_scale=None,
        v_scale=None, kv_scale=None, spec_mask=None, out=None, return_lse=False):
    """Batched decode attention over a paged KV cache.

    Shapes (B batch, Hq/Hkv heads, D head dim, P page size, N pages, M pages per request):
      q: (B, Hq, D), or (B, Lq, Hq, D) for speculative decoding (Lq <= 16); fp16/bf16, CUDA.
      k_cache, v_cache: (N, P, Hkv, D) for kv_layout="NHD" or (N, Hkv, P, D) for "HND"; q's dtype
        or float8_e4m3fn / float8_e5m2 (real value = stored * scale). Strided views with a
        contiguous last dim are fine (v_cache may be k_cache).
      page_table: (B, M) int32; token t of request b lives in page page_table[b, t // P], slot t % P.
      seq_lens: (B,) int32, tokens in the cache including the Lq new ones.
    Query i of request b sits at position seq_lens[b] - Lq + i and attends keys up to its own
    position (speculative drafts: causal, or `spec_mask` (B, Lq, Lq) bool for a tree).
    sliding_window_size=W > 0: keys in [p - W + 1, p]. sinks: (Hq,) float logits added to the
    softmax denominator, or (S, Hkv, D) sink keys in q's dtype. pos_encoding_mode="ROPE_LLAMA":
    the cache holds un-rotated keys; q and keys are rotated in the kernel (rotate-half layout).
    k_scale / v_scale: floats or float32 CUDA tensors of shape (1,) or (Hkv,); kv_scale sets both.
    Returns out (shape and dtype of q), and with return_lse=True also lse (B, Hq) or (B, Lq, Hq)
    float32, natural log, sinks included. A request with seq_lens[b] == 0 yields zeros, lse = -inf.
    """
    if torch.compiler.is_compiling():
        from .ops import xqa_op_call

        return xqa_op_call(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size,
                           num_kv_heads, kv_layout, sm_scale, pos_encoding_mode, rope_scale,
                           rope_theta, sliding_window_size, sinks, k_scale, v_scale, kv_scale,
                           spec_mask, out, return_lse)
    # Everything the checks look at, as one key: a repeat call (same shapes, strides, dtypes,
    # devices and options) skips straight to the launch.
    try:
        sig = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(),
               k_cache.dtype, k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype,
               v_cache.device, page_table.shape, page_table.stride(), page_table.dtype,
               page_table.device, seq_lens.shape, seq_lens.stride(), seq_lens.dtype,
               seq_lens.device, head_dim, page_size, num_kv_heads, kv_layout, sm_scale,
               pos_encoding_mode, rope_scale, rope_theta, sliding_window_size,
               None if sinks is None else _tsig(sinks), _ssig(k_scale), _ssig(v_scale),
               _ssig(kv_scale), None if spec_mask is None else _tsig(spec_mask),
               None if out is None else _tsig(out), return_lse, _debug())
        pl = _CALLS.get(sig)
    except (AttributeError, TypeError):  # not tensors, unhashable options: the checks will say
        sig = pl = None
    if pl is None:
        pl = _plan_xqa(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size,
                       num_kv_heads, kv_layout=kv_layout, sm_scale=sm_scale,
                       pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                       rope_theta=rope_theta, sliding_window_size=sliding_window_size, sinks=sinks,
                       k_scale=k_scale, v_scale=v_scale, kv_scale=kv_scale, spec_mask=spec_mask,
                       out=out, return_lse=return_lse)
        if sig is not None:
            if len(_CALLS) >= _MAX_CALLS:
                _CALLS.clear()
            _CALLS[sig] = pl
    if out is None:
        out = torch.empty_like(q)
    qp, kp, vp, op = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
    if (qp | kp | vp | op) & 15:
        for name, ptr in (("q", qp), ("k_cache", kp), ("v_cache", vp), ("out", op)):
            if ptr & 15:
                _fail(ValueError, f"{name} must start on a 16-byte boundary (data_ptr % 16 = "
                                  f"{ptr & 15}): 16-byte vector loads are used")
    lse = None
    lp = 0
    if pl.lse_shape is not None:
        lse = torch.empty(pl.lse_shape, dtype=torch.float32, device=q.device)
        lp = lse.data_ptr()
    sp = 0
    if sinks is not None:
        if pl.sink_fix is not None:
            sinks = pl.sink_fix(sinks)
        sp = sinks.data_ptr()
        if sp & 3:
            _fail(ValueError, f"sinks must start on a 4-byte boundary (data_ptr % 4 = {sp & 3})")
    if kv_scale is not None:
        k_scale = v_scale = kv_scale
    ksp = k_scale.data_ptr() if pl.ks_tensor else 0
    vsp = v_scale.data_ptr() if pl.vs_tensor else 0
    mp = 0
    if pl.mask_fix is not None or (spec_mask is not None and pl.mod.spec.tree):
        if pl.mask_fix is not None:
            spec_mask = pl.mask_fix(spec_mask)
        mp = spec_mask.data_ptr()
    dev = pl.dev
    stream = _raw_stream(dev)
    part = ml = cnt = 0
    if pl.splits > 1:
        pt_, cnt_ = _workspace(dev, stream).get(pl.ws_floats, pl.units, q.device)
        part = pt_.data_ptr()
        ml = part + pl.ml_off
        cnt = cnt_.data_ptr()
    err = None
    ep = 0
    if pl.debug:
        err = torch.zeros(4, dtype=torch.int32, device=q.device)
        ep = err.data_ptr()
    params = _HEAD.pack(qp, kp, vp, op, lp, page_table.data_ptr(), seq_lens.data_ptr(), sp, ksp,
                        vsp, mp, pl.invf_ptr, part, ml, cnt, ep) + pl.tail
    _launch(pl.mod, params, stream, dev)
    if err is not None:
        _raise_device_error(err, "xqa")
    return (out, lse) if return_lse else out


def _plan_xqa(q, k_cache, v_cache, page_table, seq_lens, head_dim=None, page_size=None,
        num_kv_heads=None, *, kv_layout="NHD", sm_scale=None, pos_encoding_mode="NONE",
        rope_scale=1.0, rope_theta=1e4, sliding_window_size=-1, sinks=None, k_scale=None,
        v_scale=None, kv_scale=None, spec_mask=None, out=None, return_lse=False):
    """Every host-side check of xqa, once per call signature; returns the launch plan."""
    # ---------------------------------------------------------------- q
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, f"q must be a torch.Tensor, got {type(q).__name__}")
    qt = _Q_DTYPES.get(q.dtype)
    if qt is None:
        _fail(TypeError, f"q must be float16 or bfloat16, got {q.dtype}")
    if not _is_device_ok(q):
        _fail(ValueError, f"q must be a CUDA tensor, got device {q.device}")
    device = q.device
    qd = q.dim()
    if qd == 3:
        B, Hq, D = q.shape
        Lq = 1
        q_sb, q_sh, q_sd = q.stride()
        q_si = 0
    elif qd == 4:
        B, Lq, Hq, D = q.shape
        q_sb, q_si, q_sh, q_sd = q.stride()
        if not 1 <= Lq <= 16:
            _fail(ValueError, f"q.shape[1] (Lq, query tokens per request) must be in 1..16, got {Lq}")
    else:
        _fail(ValueError, f"q must have shape (B, Hq, D) or (B, Lq, Hq, D), got {tuple(q.shape)}")
    if q_sd != 1:
        _fail(ValueError, f"q's last dimension must be contiguous (stride 1), got strides {q.stride()}")
    if D not in (64, 128, 256):
        _fail(ValueError, f"head_dim (q.shape[-1]) must be 64, 128 or 256, got {D}")
    if head_dim is not None and head_dim != D:
        _fail(ValueError, f"head_dim={head_dim} disagrees with q.shape[-1]={D}")
    # ---------------------------------------------------------------- caches
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            _fail(ValueError, f"{name} is on {t.device} but q is on {device}")
        if t.dim() != 4:
            _fail(ValueError, f"{name} must be 4-D ({'(N, P, Hkv, D)' if kv_layout == 'NHD' else '(N, Hkv, P, D)'}),"
                              f" got shape {tuple(t.shape)}")
    kvt = _KV_DTYPES.get(k_cache.dtype)
    if kvt is None or (kvt in ("fp16", "bf16") and k_cache.dtype != q.dtype):
        _fail(TypeError, f"k_cache dtype must be q's dtype ({q.dtype}) or float8_e4m3fn/float8_e5m2, "
                         f"got {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype:
        _fail(TypeError, f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        _fail(ValueError, f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                          f"{tuple(k_cache.shape)}")
    ks = k_cache.stride()
    vs = v_cache.stride()
    if kv_layout == "NHD":
        N, P, Hkv, Dk = k_cache.shape
        k_sp, k_ss, k_sh, k_sd = ks
        v_sp, v_ss, v_sh, v_sd = vs
    elif kv_layout == "HND":
        N, Hkv, P, Dk = k_cache.shape
        k_sp, k_sh, k_ss, k_sd = ks
        v_sp, v_sh, v_ss, v_sd = vs
    else:
        _fail(ValueError, f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    if Dk != D:
        _fail(ValueError, f"k_cache head_dim (last dim) is {Dk} but q.shape[-1] is {D}")
    if k_sd != 1 or v_sd != 1:
        name, st = ("k_cache", ks) if k_sd != 1 else ("v_cache", vs)
        _fail(ValueError, f"{name}'s last dimension must be contiguous (stride 1), got strides {st}")
    if page_size is not None and page_size != P:
        _fail(ValueError, f"page_size={page_size} disagrees with the cache's page dimension {P} "
                          f"(kv_layout={kv_layout})")
    if num_kv_heads is not None and num_kv_heads != Hkv:
        _fail(ValueError, f"num_kv_heads={num_kv_heads} disagrees with the cache's head dimension "
                          f"{Hkv} (kv_layout={kv_layout})")
    if P < 1 or P & (P - 1):
        _fail(ValueError, f"page_size must be a power of two, got {P}")
    if Hkv < 1 or Hq % Hkv:
        _fail(ValueError, f"num_qo_heads ({Hq}) must be a multiple of num_kv_heads ({Hkv})")
    group = Hq // Hkv
    if group > 64:
        _fail(ValueError, f"num_qo_heads / num_kv_heads must be at most 64, got {Hq}/{Hkv}={group}")
    # ---------------------------------------------------------------- page table, lengths
    M = _check_paging(page_table, seq_lens, B, device)
    if B > 65535 or B < 1:
        _fail(ValueError, f"batch size must be in 1..65535, got {B}")
    cap = M * P
    if cap >= 2**31:
        _fail(ValueError, f"page_table capacity max_pages * page_size = {cap} exceeds 2^31 tokens")
    # ---------------------------------------------------------------- options
    if pos_encoding_mode not in _POS_MODES:
        _fail(ValueError, f"pos_encoding_mode must be one of {_POS_MODES}, got {pos_encoding_mode!r}")
    rope = pos_encoding_mode == "ROPE_LLAMA"
    if sliding_window_size is None or sliding_window_size == -1:
        window = 0
    elif isinstance(sliding_window_size, int) and sliding_window_size > 0:
        window = sliding_window_size
    else:
        _fail(ValueError, f"sliding_window_size must be -1 (off) or a positive int, got "
                          f"{sliding_window_size!r}")
    for name, val in (("sm_scale", sm_scale), ("rope_scale", rope_scale), ("rope_theta", rope_theta)):
        if val is not None and not isinstance(val, numbers.Real):
            _fail(TypeError, f"{name} must be a Python float, got {type(val).__name__}")
    if rope and not (rope_scale > 0 and rope_theta > 0):
        _fail(ValueError, f"rope_scale and rope_theta must be positive, got rope_scale={rope_scale}, "
                          f"rope_theta={rope_theta}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if kv_scale is not None:
        if k_scale is not None or v_scale is not None:
            _fail(ValueError, "pass either kv_scale or k_scale/v_scale, not both")
        k_scale = v_scale = kv_scale
    kname, vname = ("kv_scale", "kv_scale") if kv_scale is not None else ("k_scale", "v_scale")
    ksf, ksp, ksh = _scale_arg(kname, k_scale, Hkv, device)
    vsf, vsp, vsh = _scale_arg(vname, v_scale, Hkv, device)
    sink_form = "none"
    sinks_fix = None
    n_sink = ks_ss = ks_sh = 0
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            _fail(TypeError, f"sinks must be a tensor, got {type(sinks).__name__}")
        if sinks.device != device:
            _fail(ValueError, f"sinks is on {sinks.device} but q is on {device}")
        if sinks.dim() == 1:
            if sinks.shape[0] != Hq:
                _fail(ValueError, f"sinks: per-head sinks must have shape (num_qo_heads,) = ({Hq},), "
                                  f"got {tuple(sinks.shape)}")
            if not sinks.is_floating_point():
                _fail(TypeError, f"sinks must be a float tensor, got {sinks.dtype}")
            if sinks.dtype != torch.float32 or sinks.stride(0) != 1:
                sinks_fix = _upcast_sinks  # models store them in bf16: upcast (each call)
                sinks = sinks_fix(sinks)
            sink_form = "per_head"
        elif sinks.dim() == 3:
            if sinks.shape[1] != Hkv or sinks.shape[2] != D:
                _fail(ValueError, f"sinks: sink keys must have shape (S, num_kv_heads={Hkv}, "
                                  f"head_dim={D}), got {tuple(sinks.shape)}")
            if sinks.dtype != q.dtype:
                _fail(TypeError, f"sinks: sink keys must have q's dtype {q.dtype}, got {sinks.dtype}")
            if sinks.stride(2) != 1 or sinks.data_ptr() % 4 or sinks.stride(0) % 2 or sinks.stride(1) % 2:
                sinks_fix = _contiguous
                sinks = sinks_fix(sinks)
            n_sink = sinks.shape[0]
            ks_ss, ks_sh = sinks.stride(0), sinks.stride(1)
            sink_form = "keys"
        else:
            _fail(ValueError, f"sinks must have shape (Hq,) = ({Hq},) or (S, Hkv, D) = (S, {Hkv}, {D}),"
                              f" got {tuple(sinks.shape)}")
    tree = False
    m_sb = m_si = 0
    mask_fix = None
    if spec_mask is not None:
        if Lq == 1 and qd == 3:
            _fail(ValueError, "spec_mask needs q of shape (B, Lq, Hq, D) with Lq > 1")
        if not isinstance(spec_mask, torch.Tensor) or spec_mask.dtype != torch.bool:
            _fail(TypeError, f"spec_mask must be a bool tensor, got "
                             f"{getattr(spec_mask, 'dtype', type(spec_mask).__name__)}")
        if spec_mask.device != device:
            _fail(ValueError, f"spec_mask is on {spec_mask.device} but q is on {device}")
        if spec_mask.shape != (B, Lq, Lq):
            _fail(ValueError, f"spec_mask must have shape (B, Lq, Lq) = ({B}, {Lq}, {Lq}), got "
                              f"{tuple(spec_mask.shape)}")
        if spec_mask.stride(2) != 1:
            mask_fix = _contiguous
            spec_mask = spec_mask.contiguous()
        if Lq > 1:
            tree = True
            m_sb, m_si = spec_mask.stride(0), spec_mask.stride(1)
    esize = k_cache.element_size()
    _check_aligned("q", q, (q_sb, q_si, q_sh), 2)
    _check_aligned("k_cache", k_cache, (k_sp, k_ss, k_sh), esize)
    _check_aligned("v_cache", v_cache, (v_sp, v_ss, v_sh), esize)
    # ---------------------------------------------------------------- outputs
    if out is None:
        out = torch.empty_like(q)  # what the fast path allocates: same strides every call
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != q.dtype:
            _fail(TypeError, f"out must be a {q.dtype} tensor, got "
                             f"{getattr(out, 'dtype', type(out).__name__)}")
        if out.shape != q.shape:
            _fail(ValueError, f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        if out.device != device:
            _fail(ValueError, f"out is on {out.device} but q is on {device}")
        if out.stride(-1) != 1:
            _fail(ValueError, f"out's last dimension must be contiguous, got strides {out.stride()}")
        _check_aligned("out", out, out.stride()[:-1], 2)
    os_ = out.stride()
    if qd == 3:
        o_sb, o_sh = os_[0], os_[1]
        o_si = 0
    else:
        o_sb, o_si, o_sh = os_[0], os_[1], os_[2]
    # ---------------------------------------------------------------- kernel and plan
    dev = _dev_index(q)
    debug = _debug()
    skey = (qt, kvt, D, group, Lq, window > 0, sink_form, rope, tree, debug, dev)
    mod = _SPECS.get(skey)
    if mod is None:
        try:
            spec = DecodeSpec(q_dtype=qt, kv_dtype=kvt, head_dim=D, group=group, q_len=Lq,
                              window=window > 0, sinks=sink_form, rope=rope, tree=tree, debug=debug)
        except SpecError as e:
            raise ValueError(str(e)) from None
        mod = _SPECS[skey] = _build.get_module(spec, _build.device_arch(dev))
    span = min(cap, window + Lq - 1) if window else cap
    units = B * Hkv * mod.info["row_chunks"]
    splits, chunk = _split_plan(mod, dev, units, span)
    invf_ptr = 0
    if rope:
        from .rope import inv_freq

        invf_ptr = inv_freq(D, rope_theta, rope_scale, device).data_ptr()
    pl = _Plan()
    pl.mod, pl.dev, pl.debug, pl.splits, pl.invf_ptr = mod, dev, debug, splits, invf_ptr
    pl.lse_shape = ((B, Hq) if qd == 3 else (B, Lq, Hq)) if return_lse else None
    pl.sink_fix = sinks_fix
    pl.ks_tensor, pl.vs_tensor = ksp != 0, vsp != 0
    pl.mask_fix = mask_fix if tree else None
    rb = mod.info["rows_per_block"]
    pl.units = units
    pl.ws_floats = units * splits * rb * (D + 2)
    pl.ml_off = units * splits * rb * D * 4
    pl.tail = _TAIL.pack(
        B, Hkv, M, N, P.bit_length() - 1, splits, chunk, window, n_sink,
        q_sb, q_si, q_sh, o_sb, o_si, o_sh, k_sp, k_ss, k_sh, v_sp, v_ss, v_sh,
        page_table.stride(0), m_sb, m_si, ks_ss, ks_sh, Lq * Hq, Hq, ksh, vsh,
        float(sm_scale), ksf, vsf)
    return pl


def _cuda_error_name(rc: int) -> str:
    try:
        from torch.cuda import cudart

        return cudart().cudaGetErrorString(rc)
    except Exception:  # pragma: no cover - best effort only
        return "see cudaError_t"


def _raise_device_error(err: torch.Tensor, what: str) -> None:
    """XQA_JIT_DEBUG=1: wait for the kernel and turn its first recorded bad value into an error."""
    code, a, b, c = err.tolist()
    if code == 1:
        raise IndexError(f"{what}: page_table[{a}, {b}] = {c} is outside the page pool "
                         f"(XQA_JIT_DEBUG)")
    if code == 2:
        raise IndexError(f"{what}: seq_lens[{a}] = {b} exceeds the page table's capacity "
                         f"max_pages * page_size = {c} (XQA_JIT_DEBUG)")


def xqa_mla(q, kv_cache, page_table, seq_lens, head_dim=None, page_size=None, num_kv_heads=None,
            *, v_head_dim=None, sm_scale=None, kv_scale=None, out=None, return_lse=False):
    """Multi-head latent attention decode over a paged latent cache.

    Keys are ``kv_cache[..., :q.shape[-1]]``. When the row is exactly the key width, values are its
    first ``v_head_dim`` elements (latent sharing, DeepSeek-V2/V3: q (B, Hq, 576), kv_cache
    (N, P, 576) or (N, P, 1, 576), v_head_dim 512 by default, out (B, Hq, 512)); otherwise values
    are the ``v_head_dim`` elements right after the keys (the seed doc's form: kv_cache
    (N, P, Hkv, 2*D) holding [K | V], q (B, Hq, D), out (B, Hq, D)). Pass the model's softmax scale
    as sm_scale (DeepSeek-V3: 192**-0.5 * mscale**2); the default 1/sqrt(q.shape[-1]) suits only the
    seed form. kv_scale dequantises an FP8 cache. Positions, seq_lens, page_table, lse: as xqa.
    """
    if torch.compiler.is_compiling():
        from .ops import xqa_mla_op_call

        return xqa_mla_op_call(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                               v_head_dim, sm_scale, kv_scale, out, return_lse)
    from .mla import mla_dispatch

    return mla_dispatch(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                        v_head_dim, sm_scale, kv_scale, out, return_lse)
