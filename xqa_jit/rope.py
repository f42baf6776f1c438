"""Rotary-embedding frequencies shared by the kernel launch path and the reference.

The table is computed exactly as Hugging Face's Llama rotary does ("default"/"linear" rope types):
inv_freq = 1 / theta ** (arange(0, D, 2) / D) in float32, divided by the linear factor in float32.
The kernel reads this float32 table, so kernel and reference rotate by the same frequencies.
"""
from __future__ import annotations

import torch

_TABLES: dict = {}


def inv_freq(head_dim: int, rope_theta: float, rope_scale: float, device=None) -> torch.Tensor:
    """(head_dim // 2,) float32 tensor of rotary frequencies, memoized per (D, theta, scale, device).

    Kept alive for the life of the process, so a CUDA graph that captured its pointer stays valid.
    """
    key = (head_dim, float(rope_theta), float(rope_scale), str(device))
    t = _TABLES.get(key)
    if t is None:
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        t = 1.0 / (float(rope_theta) ** exps)
        if rope_scale != 1.0:
            t = t / float(rope_scale)
        t = t.to(torch.float32)
        if device is not None:
            t = t.to(device)
        _TABLES[key] = t
    return t
