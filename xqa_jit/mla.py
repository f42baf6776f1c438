"""xqa_mla: routes the two MLA forms of API.md to their kernels.

Seed form (row = [K | V], wider than the keys): exactly paged decode over two strided views of the
fused cache, so it runs on the decode kernel. Latent form (row == key width, values a prefix of the
row, DeepSeek-V2/V3): the latent kernel of templates/mla.cu.jinja.
"""
from __future__ import annotations

import torch


def mla_dispatch(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads, v_head_dim,
                 sm_scale, kv_scale, out, return_lse):
    from .api import xqa

    if not isinstance(q, torch.Tensor) or not isinstance(kv_cache, torch.Tensor):
        raise TypeError("q and kv_cache must be tensors")
    if q.dim() != 3:
        raise ValueError(f"xqa_mla: q must have shape (B, Hq, D), got {tuple(q.shape)}")
    dk = q.shape[-1]
    width = kv_cache.shape[-1]
    if head_dim is not None and head_dim != dk:
        raise ValueError(f"xqa_mla: head_dim={head_dim} disagrees with q.shape[-1]={dk}")
    if width == dk:  # latent sharing: values are the row's first v_head_dim elements
        from .mla_latent import mla_latent

        return mla_latent(q, kv_cache, page_table, seq_lens, page_size, num_kv_heads, v_head_dim,
                          sm_scale, kv_scale, out, return_lse)
    dv = v_head_dim if v_head_dim is not None else width - dk
    if dk + dv != width:
        raise ValueError(f"xqa_mla: kv_cache rows of {width} elements hold keys ({dk}) followed by "
                         f"values; v_head_dim={dv} does not fit ({dk} + {dv} != {width})")
    if dv != dk:
        raise ValueError(f"xqa_mla: the [K | V] form needs v_head_dim == q.shape[-1], got "
                         f"{dv} != {dk}")
    if kv_cache.dim() != 4:
        raise ValueError(f"xqa_mla: a [K | V] cache must be (N, P, Hkv, 2*D), got "
                         f"{tuple(kv_cache.shape)}")
    return xqa(q, kv_cache[..., :dk], kv_cache[..., dk:], page_table, seq_lens, head_dim,
               page_size, num_kv_heads, sm_scale=sm_scale, kv_scale=kv_scale, out=out,
               return_lse=return_lse)
