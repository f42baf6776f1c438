"""Input builders and checks shared by the tests (CPU and GPU).

Every random tensor is drawn on the CPU from an explicit ``torch.Generator`` (so a test's inputs depend
only on its seed, not on the device) and then moved to the requested device.
"""
from __future__ import annotations

import math
import zlib
from typing import NamedTuple, Optional, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

#: Module-level marks for GPU test files: ``pytestmark = GPU_MARKS``.
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def requires_gpu(obj):
    """Decorator: mark a test (or class) ``gpu`` and skip it when CUDA is not available."""
    for mark in reversed(GPU_MARKS):
        obj = mark(obj)
    return obj


def seed_for(text: str) -> int:
    """A stable 31-bit seed derived from a string (e.g. a test's node id)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def randn(shape, gen: torch.Generator, *, std: float = 1.0, mean: float = 0.0,
          dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Normal(mean, std) drawn in float32 on the CPU, cast to dtype (FP8 included), moved to device."""
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std + mean
    return x.to(dtype).to(device)


def rand_uniform(shape, gen: torch.Generator, lo: float, hi: float, device="cpu") -> torch.Tensor:
    return (torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo).to(device)


def make_page_table(seq_lens: Sequence[int], page_size: int, gen: torch.Generator, *,
                    extra_pages: int = 2, extra_cols: int = 2, garbage: bool = True, device="cpu"):
    """Page table over a pool whose pages are handed out in a random order.

    Returns (page_table (B, M) int32, num_pages N). Entries past each request's last page hold
    garbage when ``garbage``: -1, ids just past the pool, huge positive/negative int32 values, and
    valid ids of other requests' pages (reading any of them would crash or give wrong results).
    """
    seq_lens = [int(s) for s in seq_lens]
    need = [(s + page_size - 1) // page_size for s in seq_lens]
    num_pages = sum(need) + max(extra_pages, 1)
    perm = torch.randperm(num_pages, generator=gen)
    B = len(seq_lens)
    M = max(need + [0]) + extra_cols
    M = max(M, 1)
    if garbage:
        kind = torch.randint(0, 5, (B, M), generator=gen)
        table = torch.where(kind == 0, torch.full((B, M), -1, dtype=torch.int64),
                torch.where(kind == 1, num_pages + torch.randint(0, 1000, (B, M), generator=gen),
                torch.where(kind == 2, torch.randint(-2**31, 2**31 - 1, (B, M), generator=gen),
                torch.where(kind == 3, torch.full((B, M), 2**31 - 1, dtype=torch.int64),
                            torch.randint(0, num_pages, (B, M), generator=gen)))))
    else:
        table = torch.zeros(B, M, dtype=torch.int64)
    off = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[off:off + n]
        off += n
    return table.to(torch.int32).to(device), num_pages


class PagedKV(NamedTuple):
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor  # (B, M) int32
    seq_lens: torch.Tensor  # (B,) int32


def _page_shape(layout: str, page_size: int, hkv: int, d: int):
    if layout == "NHD":
        return (page_size, hkv, d)
    if layout == "HND":
        return (hkv, page_size, d)
    raise ValueError(layout)


def make_paged_kv(batch: int, hkv: int, d: int, page_size: int, seq_lens: Sequence[int],
                  dtype: torch.dtype, layout: str = "NHD", device="cuda", *, gen: torch.Generator,
                  std: float = 1.0, dv: Optional[int] = None, shared_pool: bool = False,
                  same_kv: bool = False, extra_pages: int = 2, extra_cols: int = 2,
                  garbage: bool = True) -> PagedKV:
    """Random paged K/V caches with a shuffled page table.

    k_cache: (N, P, Hkv, D) for "NHD", (N, Hkv, P, D) for "HND"; v_cache likewise with last dim dv.
    FP8 dtypes are drawn as Normal(0, std) and cast. ``shared_pool``: K and V are the two halves of one
    (N, 2, ...) pool (strided views). ``same_kv``: v_cache is k_cache. Unused pages are random too.
    """
    seq_lens = [int(s) for s in seq_lens]
    if len(seq_lens) != batch:
        raise ValueError(f"batch={batch} but {len(seq_lens)} seq_lens")
    dv = d if dv is None else dv
    table, n = make_page_table(seq_lens, page_size, gen, extra_pages=extra_pages,
                               extra_cols=extra_cols, garbage=garbage, device=device)
    if shared_pool:
        if dv != d:
            raise ValueError("shared_pool needs dv == d")
        pool = randn((n, 2) + _page_shape(layout, page_size, hkv, d), gen, std=std, dtype=dtype, device=device)
        k, v = pool[:, 0], pool[:, 1]
    else:
        k = randn((n,) + _page_shape(layout, page_size, hkv, d), gen, std=std, dtype=dtype, device=device)
        v = k if same_kv else randn((n,) + _page_shape(layout, page_size, hkv, dv), gen, std=std,
                                    dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedKV(k, v, table, lens)


def make_latent_kv(seq_lens: Sequence[int], page_size: int, width: int, dtype: torch.dtype,
                   device="cuda", *, gen: torch.Generator, hkv: Optional[int] = None, std: float = 1.0,
                   garbage: bool = True):
    """MLA cache (N, P, width), or (N, P, hkv, width) when hkv is given. Returns (kv, page_table, seq_lens)."""
    table, n = make_page_table(seq_lens, page_size, gen, garbage=garbage, device=device)
    shape = (n, page_size, width) if hkv is None else (n, page_size, hkv, width)
    kv = randn(shape, gen, std=std, dtype=dtype, device=device)
    lens = torch.tensor([int(s) for s in seq_lens], dtype=torch.int32, device=device)
    return kv, table, lens


def make_q(batch: int, hq: int, d: int, dtype: torch.dtype, gen: torch.Generator, *,
           lq: Optional[int] = None, std: float = 2.0, device="cuda") -> torch.Tensor:
    """Query (B, Hq, D), or (B, Lq, Hq, D) when lq is given.

    std 2 with unit-variance keys gives q.k/sqrt(D) a spread of ~2 units: a clearly non-uniform softmax.
    """
    shape = (batch, hq, d) if lq is None else (batch, lq, hq, d)
    return randn(shape, gen, std=std, dtype=dtype, device=device)


def random_parents(lq: int, gen: torch.Generator, *, forest: bool = False) -> list:
    """parent[j] < j for j > 0 (-1 = root). Draft 0 is always a root; with forest, others may be too."""
    parents = [-1]
    for j in range(1, lq):
        lo = -1 if forest else 0
        parents.append(int(torch.randint(lo, j, (1,), generator=gen)))
    return parents


def tree_mask_from_parents(parents: Sequence[int]) -> torch.Tensor:
    """(Lq, Lq) bool: mask[i, j] True where j is i or one of its ancestors."""
    lq = len(parents)
    m = torch.zeros(lq, lq, dtype=torch.bool)
    for i in range(lq):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def make_tree_mask(batch: int, lq: int, gen: torch.Generator, *, forest: bool = False,
                   device="cuda") -> torch.Tensor:
    """(B, Lq, Lq) bool spec_mask: an independent random tree per request."""
    masks = [tree_mask_from_parents(random_parents(lq, gen, forest=forest)) for _ in range(batch)]
    return torch.stack(masks).to(device)


def causal_mask(batch: int, lq: int, device="cuda") -> torch.Tensor:
    return torch.ones(lq, lq, dtype=torch.bool).tril().expand(batch, lq, lq).contiguous().to(device)


def make_sinks_per_head(hq: int, gen: torch.Generator, *, dtype=torch.float32, device="cuda") -> torch.Tensor:
    """(Hq,) sink logits around the typical max score, so they visibly change the output."""
    return randn((hq,), gen, std=2.0, mean=2.0, dtype=dtype, device=device)


def make_sink_keys(num_sinks: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator, *,
                   device="cuda") -> torch.Tensor:
    """(S, Hkv, D) sink key vectors in the q dtype."""
    return randn((num_sinks, hkv, d), gen, std=1.5, dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    diff = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / den


def assert_attn_close(out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float,
                      max_rel: float, msg: str = "") -> None:
    """out (any float dtype) vs a float32/64 reference: no NaN/inf, elementwise close, and a norm bound."""
    assert out.shape == ref.shape, f"{msg}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().float()
    assert torch.isfinite(o).all(), f"{msg}: {int((~torch.isfinite(o)).sum())} non-finite output elements"
    r = ref.detach().to(device=o.device, dtype=torch.float32)
    torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
    e = rel_err(o, r)
    assert e <= max_rel, f"{msg}: relative error {e:.3e} > {max_rel:.1e}"


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, *, atol: float, msg: str = "") -> None:
    """LSE (float32): -inf exactly where the reference has -inf, finite entries within atol."""
    assert lse.dtype == torch.float32, f"{msg}: lse dtype {lse.dtype}, expected float32"
    assert lse.shape == ref_lse.shape, f"{msg}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    l = lse.detach().cpu()
    r = ref_lse.detach().cpu().float()
    assert not torch.isnan(l).any(), f"{msg}: NaN in lse"
    ninf = torch.isneginf(r)
    assert torch.equal(torch.isneginf(l), ninf), f"{msg}: lse -inf pattern differs from the reference"
    fin = ~ninf
    torch.testing.assert_close(l[fin], r[fin], atol=atol, rtol=0.0, msg=lambda m: f"{msg} (lse): {m}")


# ----------------------------------------------------------------------------------------------------
# GPU suites: kernel variants and the kernel-vs-reference check
# ----------------------------------------------------------------------------------------------------

F16, BF16 = torch.float16, torch.bfloat16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_SHORT = {F16: "fp16", BF16: "bf16", E4M3: "e4m3", E5M2: "e5m2"}

# GPU tests' tolerances against the float64 reference, by q / output dtype: elementwise atol/rtol,
# max_rel on the relative Frobenius error, lse_atol on the natural-log lse; FP8 caches loosen
# max_rel to FP8_MAX_REL (quantisation error of the cache on top of the output's rounding).
TOL = {
    F16: dict(atol=5e-3, rtol=5e-3, max_rel=2e-3, lse_atol=1e-3),
    BF16: dict(atol=3e-2, rtol=3e-2, max_rel=1e-2, lse_atol=5e-3),
}
FP8_MAX_REL = {F16: 2e-3, BF16: 5e-3}


class Kernel(NamedTuple):
    """What changes the generated decode code (mirrors xqa_jit.spec.DecodeSpec): one compile each."""

    q: torch.dtype
    kv: torch.dtype
    d: int
    group: int
    lq: int = 1
    window: bool = False
    sinks: str = "none"  # "none" | "per_head" | "keys"
    rope: bool = False
    tree: bool = False

    @property
    def name(self) -> str:
        n = f"q{_SHORT[self.q]}_kv{_SHORT[self.kv]}_d{self.d}_g{self.group}"
        if self.lq > 1:
            n += f"_lq{self.lq}"
        for flag, tag in ((self.tree, "tree"), (self.window, "win"), (self.sinks != "none", f"sink{self.sinks}"),
                          (self.rope, "rope")):
            if flag:
                n += "_" + tag
        return n


class MlaKernel(NamedTuple):
    """What changes the generated latent-MLA code (mirrors xqa_jit.spec.MlaSpec)."""

    q: torch.dtype
    kv: torch.dtype
    heads: int

    @property
    def name(self) -> str:
        return f"mla_q{_SHORT[self.q]}_kv{_SHORT[self.kv]}_h{self.heads}"


def kernel_ids(k) -> str:
    return k.name


def dequantize(cache: torch.Tensor, scale, layout: str = "NHD") -> torch.Tensor:
    """stored * scale as float32; scale a float or a (1,)/(Hkv,) tensor (per KV head)."""
    x = cache.float()
    if scale is None:
        return x
    if isinstance(scale, torch.Tensor):
        s = scale.float().reshape(-1).to(x.device)
        if s.numel() > 1:
            shape = [1, 1, -1, 1] if layout == "NHD" else [1, -1, 1, 1]
            if x.dim() == 3:  # (N, P, W) latent cache has a single "head"
                shape = [1, 1, -1]
            s = s.reshape(shape)
        return x * s
    return x * float(scale)


def check_xqa(q, kv: PagedKV, *, layout: str = "NHD", atol: float, rtol: float, max_rel: float,
              lse_atol: float, dequant: bool = False, msg: str = "", **kw):
    """Run xqa_jit.xqa and the reference on the same inputs; assert out and lse agree.

    kw are the keyword arguments shared by both (sm_scale, sinks, spec_mask, scales, ...). With
    ``dequant`` the reference runs on the dequantised float32 cache (scales applied up front) instead
    of being given the FP8 cache and the scales.
    """
    import xqa_jit
    from xqa_jit.reference import xqa_reference

    out, lse = xqa_jit.xqa(q, kv.k_cache, kv.v_cache, kv.page_table, kv.seq_lens, kv_layout=layout,
                           return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape, f"{msg}: out {out.dtype} {tuple(out.shape)}"
    rkw = dict(kw)
    k, v = kv.k_cache, kv.v_cache
    if dequant:
        ks = rkw.pop("k_scale", None)
        vs = rkw.pop("v_scale", None)
        both = rkw.pop("kv_scale", None)
        if both is not None:
            ks = vs = both
        k, v = dequantize(k, ks, layout), dequantize(v, vs, layout)
    ref, ref_lse = xqa_reference(q, k, v, kv.page_table, kv.seq_lens, kv_layout=layout, return_lse=True, **rkw)
    assert_attn_close(out, ref, atol=atol, rtol=rtol, max_rel=max_rel, msg=msg)
    assert_lse_close(lse, ref_lse, atol=lse_atol, msg=msg)
    return out, lse


def edge_lens(page_size: int, gen: torch.Generator, *, longest: int = 1500, min_len: int = 0) -> list:
    """Lengths hitting the edges of paging: empty, one token, one short of / past a page, a random one."""
    P = page_size
    lens = [0, 1, max(P - 1, 2), P + 1, 2 * P + P // 2 + 3, int(torch.randint(200, longest, (1,), generator=gen))]
    return [l if l == 0 else max(l, min_len) for l in lens]
