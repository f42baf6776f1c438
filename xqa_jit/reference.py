"""PyTorch reference of the xqa_jit contract (API.md), used by every test and benchmark.

Everything is computed in float64 on the inputs' device (inputs are upcast, FP8 caches dequantised
with their scales) and returned as float32. The computation is vectorised over tokens and heads; the
batch is processed in chunks only to bound memory.

Semantics (identical to the kernels):

- Token t of request b lives in page ``page_table[b, t // P]``, slot ``t % P``; caches are
  (N, P, Hkv, D) for "NHD" and (N, Hkv, P, D) for "HND". Page-table entries past a request's last
  page are never used as indices (they may hold garbage, even out-of-range ids).
- Query i (0 <= i < Lq) of a request of length len sits at cache position ``len - Lq + i``. Key t is
  visible to query i iff t < len - Lq, or (j = t - (len - Lq)) spec_mask[b, i, j] (default: j <= i).
  A sliding window W > 0 additionally requires t >= (len - Lq + i) - W + 1 (cache positions).
- GQA: query head h reads KV head h // (Hq // Hkv).
- Scores are ``sm_scale * q . k`` with k = stored * k_scale; values are stored * v_scale.
- ROPE_LLAMA: q and keys rotated (rotate-half layout) by ``pos * inv_freq`` with the float32 table of
  :func:`xqa_jit.rope.inv_freq`. Key t at position t, query i at len - Lq + i; with a tree mask, draft j
  (as a query and as a key) is rotated at ``len - Lq + depth(j)``, depth(j) = sum_i spec_mask[b, j, i] - 1.
- Sinks: (Hq,) logits added to the denominator as e^{sink} (not scaled by sm_scale); or (S, Hkv, D)
  sink keys adding e^{sm_scale * q_rot . k_sink} each (keys not rotated, not FP8-scaled). Sinks are never
  masked, carry no value, and count in the LSE.
- A request with len == 0 gives out = 0 and lse = -inf, sinks or not. A query with nothing to attend
  (no visible key, no sink) gives out = 0 and lse = -inf.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .rope import inv_freq as _inv_freq

__all__ = ["xqa_reference", "mla_reference", "gather_kv", "gather_kv_batch", "tree_depth"]

# Upper bound on float64 elements of one gathered K+V chunk (~512 MiB): longer batches are chunked.
_CHUNK_ELEMS = 1 << 26

Scale = Union[None, float, torch.Tensor]


def _cache_dims(cache: torch.Tensor, kv_layout: str) -> Tuple[int, int]:
    """(page_size, num_kv_heads) of a 4-D cache in the given layout."""
    if cache.dim() != 4:
        raise ValueError(f"cache must be 4-D (N, P, Hkv, D) or (N, Hkv, P, D), got shape {tuple(cache.shape)}")
    if kv_layout == "NHD":
        return cache.shape[1], cache.shape[2]
    if kv_layout == "HND":
        return cache.shape[2], cache.shape[1]
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")


def gather_kv_batch(cache: torch.Tensor, page_table: torch.Tensor, seq_lens, kv_layout: str = "NHD") -> torch.Tensor:
    """Gather the cached rows of several requests into a dense, zero-padded tensor.

    cache: (N, P, Hkv, D) ("NHD") or (N, Hkv, P, D) ("HND"), any dtype.
    page_table: (B, M) integer. seq_lens: (B,) ints (tensor or sequence).
    Returns (B, T, Hkv, D) float64 with T = max(seq_lens); rows t >= seq_lens[b] are zero.
    Only the first ceil(seq_lens[b] / P) page-table entries of request b are used as indices.
    """
    P, _ = _cache_dims(cache, kv_layout)
    lens = torch.as_tensor(seq_lens, dtype=torch.int64).cpu()
    B = lens.numel()
    T = int(lens.max()) if B else 0
    H, D = (cache.shape[2], cache.shape[3]) if kv_layout == "NHD" else (cache.shape[1], cache.shape[3])
    if T == 0:
        return torch.zeros(B, 0, H, D, dtype=torch.float64, device=cache.device)
    n_pages = (T + P - 1) // P
    if page_table.shape[1] < n_pages:
        raise ValueError(f"page_table has {page_table.shape[1]} columns, a length of {T} needs {n_pages}")
    used = (lens + P - 1) // P  # pages each request really owns
    ids = page_table[:, :n_pages].to(device=cache.device, dtype=torch.int64)
    owned = torch.arange(n_pages, device=cache.device)[None, :] < used.to(cache.device)[:, None]
    ids = torch.where(owned, ids, torch.zeros_like(ids))  # garbage entries never index the cache
    pages = cache[ids]  # (B, n_pages, P, H, D) or (B, n_pages, H, P, D)
    if kv_layout == "HND":
        pages = pages.transpose(2, 3)
    rows = pages.reshape(B, n_pages * P, H, D)[:, :T].to(torch.float64)
    valid = torch.arange(T, device=cache.device)[None, :] < lens.to(cache.device)[:, None]
    return rows * valid[:, :, None, None]


def gather_kv(cache: torch.Tensor, page_table: torch.Tensor, seq_len_b: int, kv_layout: str = "NHD",
              b: Optional[int] = None) -> torch.Tensor:
    """Rows of one request as (seq_len_b, Hkv, D) float64.

    page_table is that request's row (M,), or the whole (B, M) table together with b.
    """
    row = page_table[b] if b is not None else page_table
    return gather_kv_batch(cache, row.reshape(1, -1), [int(seq_len_b)], kv_layout)[0]


def tree_depth(spec_mask: torch.Tensor) -> torch.Tensor:
    """depth(j) = sum_i spec_mask[..., j, i] - 1 (number of ancestors); int64 of shape (..., Lq)."""
    return spec_mask.to(torch.int64).sum(-1) - 1


def _scale_tensor(scale: Scale, hkv: int, device, name: str) -> Optional[torch.Tensor]:
    """A dequantisation scale as float64 broadcastable over (B, T, Hkv, D), or None."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(device=device, dtype=torch.float64).reshape(-1)
        if s.numel() not in (1, hkv):
            raise ValueError(f"{name} must have shape (1,) or (Hkv,) = ({hkv},), got {tuple(scale.shape)}")
        return s.reshape(1, 1, -1, 1)
    return torch.full((1, 1, 1, 1), float(scale), dtype=torch.float64, device=device)


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (..., D) float64; pos float64 broadcastable to x.shape[:-1]; inv (D/2,)."""
    ang = pos[..., None] * inv
    cos, sin = torch.cos(ang), torch.sin(ang)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def xqa_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    head_dim: Optional[int] = None,
    page_size: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    *,
    kv_layout: str = "NHD",
    sm_scale: Optional[float] = None,
    pos_encoding_mode: str = "NONE",
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    sliding_window_size: int = -1,
    sinks: Optional[torch.Tensor] = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    kv_scale: Scale = None,
    spec_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Reference of :func:`xqa_jit.xqa`.

    q: (B, Hq, D) or (B, Lq, Hq, D). k_cache: (N, P, Hkv, D) / (N, Hkv, P, D); v_cache likewise with
    its own last dim Dv (Dv = D for xqa; MLA passes a different one). page_table (B, M) int;
    seq_lens (B,) int. Returns out float32 of shape q.shape[:-1] + (Dv,), and with return_lse also
    lse float32 of shape q.shape[:-1] (natural log).
    """
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, Hq, D) or (B, Lq, Hq, D), got shape {tuple(q.shape)}")
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(1) if squeeze else q
    B, Lq, Hq, D = q4.shape
    P, Hkv = _cache_dims(k_cache, kv_layout)
    Pv, Hkv_v = _cache_dims(v_cache, kv_layout)
    if (Pv, Hkv_v) != (P, Hkv) or v_cache.shape[0] != k_cache.shape[0]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} disagree")
    if k_cache.shape[-1] != D:
        raise ValueError(f"q head dim {D} != k_cache head dim {k_cache.shape[-1]}")
    Dv = v_cache.shape[-1]
    for name, given, actual in (("head_dim", head_dim, D), ("page_size", page_size, P), ("num_kv_heads", num_kv_heads, Hkv)):
        if given is not None and int(given) != actual:
            raise ValueError(f"{name}={given} but the tensors say {actual}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if seq_lens.shape != (B,) or page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} / page_table {tuple(page_table.shape)} do not match B={B}")
    if pos_encoding_mode not in ("NONE", "ROPE_LLAMA"):
        raise ValueError(f"pos_encoding_mode must be 'NONE' or 'ROPE_LLAMA', got {pos_encoding_mode!r}")
    if kv_scale is not None:
        if k_scale is not None or v_scale is not None:
            raise ValueError("pass either kv_scale or k_scale/v_scale, not both")
        k_scale = v_scale = kv_scale
    if spec_mask is not None and tuple(spec_mask.shape) != (B, Lq, Lq):
        raise ValueError(f"spec_mask must be (B, Lq, Lq) = {(B, Lq, Lq)}, got {tuple(spec_mask.shape)}")

    dev = q.device
    f64 = torch.float64
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    window = int(sliding_window_size) if sliding_window_size is not None else -1
    ks = _scale_tensor(k_scale, Hkv, dev, "k_scale")
    vs = _scale_tensor(v_scale, Hkv, dev, "v_scale")
    inv = None
    if pos_encoding_mode == "ROPE_LLAMA":
        if D % 2:
            raise ValueError(f"ROPE_LLAMA needs an even head_dim, got {D}")
        inv = _inv_freq(D, rope_theta, rope_scale).to(device=dev, dtype=f64)

    sink_logit = sink_keys = None
    if sinks is not None:
        if sinks.dim() == 1:
            if sinks.shape[0] != Hq:
                raise ValueError(f"per-head sinks must be (Hq,) = ({Hq},), got {tuple(sinks.shape)}")
            sink_logit = sinks.to(device=dev, dtype=f64).reshape(1, 1, Hkv, G, 1)
        elif sinks.dim() == 3:
            if sinks.shape[1:] != (Hkv, D):
                raise ValueError(f"sink keys must be (S, Hkv, D) = (S, {Hkv}, {D}), got {tuple(sinks.shape)}")
            sink_keys = sinks.to(device=dev, dtype=f64)  # (S, Hkv, D)
        else:
            raise ValueError(f"sinks must be (Hq,) or (S, Hkv, D), got {tuple(sinks.shape)}")

    lens_all = seq_lens.detach().to("cpu", torch.int64)
    out = torch.zeros(B, Lq, Hq, Dv, dtype=f64, device=dev)
    lse = torch.full((B, Lq, Hq), -math.inf, dtype=f64, device=dev)

    # Chunk the batch so that the padded K+V gather and the score tensors stay bounded.
    per_token = Hkv * (D + Dv) + 2 * Lq * Hq
    b0 = 0
    while b0 < B:
        b1 = b0 + 1
        while b1 < B and max(int(lens_all[b0:b1 + 1].max()), 1) * (b1 + 1 - b0) * per_token <= _CHUNK_ELEMS:
            b1 += 1
        lens = lens_all[b0:b1]
        T = int(lens.max())
        if T > 0:
            o, l = _attend(
                q4[b0:b1].to(f64), k_cache, v_cache, page_table[b0:b1], lens, kv_layout,
                scale=scale, window=window, inv=inv, ks=ks, vs=vs, sink_logit=sink_logit,
                sink_keys=sink_keys, spec_mask=None if spec_mask is None else spec_mask[b0:b1],
            )
            out[b0:b1] = o
            lse[b0:b1] = l
        b0 = b1

    # Empty requests: zeros and -inf, even with sinks.
    empty = (lens_all == 0).to(dev)
    out = torch.where(empty[:, None, None, None], torch.zeros_like(out), out)
    lse = torch.where(empty[:, None, None], torch.full_like(lse, -math.inf), lse)

    out = out.to(torch.float32)
    lse = lse.to(torch.float32)
    if squeeze:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out


def _attend(q, k_cache, v_cache, page_table, lens, kv_layout, *, scale, window, inv, ks, vs,
            sink_logit, sink_keys, spec_mask):
    """Attention of one batch chunk. q (b, Lq, Hq, D) float64; lens (b,) int64 on CPU.

    Returns out (b, Lq, Hq, Dv) and lse (b, Lq, Hq), float64.
    """
    dev = q.device
    f64 = torch.float64
    b, Lq, Hq, D = q.shape
    K = gather_kv_batch(k_cache, page_table, lens, kv_layout)  # (b, T, Hkv, D)
    V = gather_kv_batch(v_cache, page_table, lens, kv_layout)  # (b, T, Hkv, Dv)
    T, Hkv = K.shape[1], K.shape[2]
    G = Hq // Hkv
    if ks is not None:
        K = K * ks
    if vs is not None:
        V = V * vs

    L = lens.to(dev)[:, None]  # (b, 1)
    base = L - Lq  # cache position of draft 0
    t = torch.arange(T, device=dev)[None, :]  # (1, T)
    i = torch.arange(Lq, device=dev)[None, :]  # (1, Lq)
    j = t - base  # (b, T): draft index of key t (negative before the drafts)
    is_draft = (j >= 0) & (t < L)
    jc = j.clamp(0, Lq - 1)

    # Visibility (b, Lq, T).
    if spec_mask is None:
        draft_ok = jc[:, None, :] <= i[:, :, None]
    else:
        sm = spec_mask.to(device=dev, dtype=torch.bool)
        draft_ok = torch.gather(sm, 2, jc[:, None, :].expand(b, Lq, T))
    visible = (t < L)[:, None, :] & (~is_draft[:, None, :] | draft_ok)
    if window > 0:
        qpos = base + i  # (b, Lq) cache positions
        visible &= t[:, None, :] >= (qpos - window + 1)[:, :, None]

    qg = q.reshape(b, Lq, Hkv, G, D)
    if inv is not None:
        if spec_mask is None:
            qrope = (base + i).to(f64)
            krope = t.expand(b, T).to(f64)
        else:
            depth = tree_depth(spec_mask.to(dev))  # (b, Lq)
            qrope = (base + depth).to(f64)
            krope = torch.where(is_draft, base + torch.gather(depth, 1, jc), t.expand(b, T)).to(f64)
        qg = _rotate(qg, qrope[:, :, None, None], inv)
        K = _rotate(K, krope[:, :, None], inv)

    s = torch.einsum("blkgd,btkd->blkgt", qg, K) * scale  # (b, Lq, Hkv, G, T)
    s = s.masked_fill(~visible[:, :, None, None, :], -math.inf)

    extra = None  # sink logits (b, Lq, Hkv, G, S)
    if sink_logit is not None:
        extra = sink_logit.expand(b, Lq, Hkv, G, 1)
    elif sink_keys is not None:
        extra = torch.einsum("blkgd,skd->blkgs", qg, sink_keys) * scale

    m = s.amax(-1)
    if extra is not None:
        m = torch.maximum(m, extra.amax(-1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m[..., None])
    denom = e.sum(-1)
    if extra is not None:
        denom = denom + torch.exp(extra - m[..., None]).sum(-1)
    num = torch.einsum("blkgt,btkd->blkgd", e, V)
    pos = denom > 0
    out = torch.where(pos[..., None], num / torch.where(pos, denom, torch.ones_like(denom))[..., None],
                      torch.zeros_like(num))
    lse = m + torch.log(denom)  # log(0) = -inf for rows with nothing to attend
    return out.reshape(b, Lq, Hq, -1), lse.reshape(b, Lq, Hq)


def mla_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    head_dim: Optional[int] = None,
    page_size: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    *,
    v_head_dim: Optional[int] = None,
    sm_scale: Optional[float] = None,
    kv_scale: Scale = None,
    return_lse: bool = False,
):
    """Reference of :func:`xqa_jit.xqa_mla`.

    q: (B, Hq, Dk) (or (B, Lq, Hq, Dk)). kv_cache: (N, P, W) or (N, P, Hkv, W).
    Keys are kv_cache[..., :Dk]. When W == Dk the values are the first v_head_dim elements of the row
    (latent sharing; v_head_dim defaults to 512 for 576-wide rows, required otherwise); when W > Dk
    they are the v_head_dim elements right after the keys (default W - Dk). kv_scale multiplies both.
    Default sm_scale 1/sqrt(Dk). Returns out float32 (..., Hq, v_head_dim) [and lse float32].
    """
    kv = kv_cache.unsqueeze(2) if kv_cache.dim() == 3 else kv_cache
    if kv.dim() != 4:
        raise ValueError(f"kv_cache must be (N, P, W) or (N, P, Hkv, W), got {tuple(kv_cache.shape)}")
    Dk = q.shape[-1]
    W = kv.shape[-1]
    if W == Dk:
        if v_head_dim is None:
            if Dk != 576:
                raise ValueError(f"v_head_dim must be given for {W}-wide latent rows")
            v_head_dim = 512
        if not 0 < v_head_dim <= W:
            raise ValueError(f"v_head_dim={v_head_dim} does not fit a {W}-wide row")
        vals = kv[..., :v_head_dim]
    elif W > Dk:
        if v_head_dim is None:
            v_head_dim = W - Dk
        if not 0 < v_head_dim <= W - Dk:
            raise ValueError(f"v_head_dim={v_head_dim} does not fit after {Dk} key elements in a {W}-wide row")
        vals = kv[..., Dk:Dk + v_head_dim]
    else:
        raise ValueError(f"kv_cache rows ({W}) are narrower than q ({Dk})")
    return xqa_reference(
        q, kv[..., :Dk], vals, page_table, seq_lens, head_dim, page_size, num_kv_heads,
        kv_layout="NHD", sm_scale=sm_scale, kv_scale=kv_scale, return_lse=return_lse,
    )
