"""torch.library custom ops wrapping xqa / xqa_mla, so torch.compile(fullgraph=True) traces them.

``xqa_jit.xqa`` and ``xqa_jit.xqa_mla`` call :func:`xqa_op_call` / :func:`xqa_mla_op_call` when
``torch.compiler.is_compiling()``; eager calls never import this module (registering ops costs a few
milliseconds and importing xqa_jit stays cheap).

Four ops in the ``xqa_jit`` namespace:

- ``xqa_jit::xqa(...) -> (Tensor out, Tensor lse)``: functional, returns a fresh ``out``.
- ``xqa_jit::xqa_out(Tensor(a!) out, ...) -> Tensor lse``: writes the caller's ``out=`` in place.
- ``xqa_jit::xqa_mla`` / ``xqa_jit::xqa_mla_out``: the same pair for xqa_mla.

``lse`` is an empty float32 tensor when ``return_lse`` is False (the kernel then skips writing it);
the Python wrappers return exactly what the eager functions return.

Why a separate mutating op for ``out=`` rather than "return a fresh tensor, then out.copy_()": with
``mutates_args=("out",)`` the op is functionalised (``auto_functionalized``) while tracing and
Inductor re-inplaces it, so the kernel writes the caller's buffer directly: no extra allocation, no
extra copy kernel, and the buffer address is the one the caller owns, which is what a decode step
captured in a CUDA graph (``mode="reduce-overhead"`` or a manual ``torch.cuda.CUDAGraph`` around a
compiled step) relies on. The functional op keeps ``out=None`` free of any input mutation, so the
graph it sits in stays a pure function (no mutated graph inputs for cudagraph trees to worry about).
Neither op is aliasing: custom ops may not return views of their inputs.

Schemas cannot carry "a float or a tensor", so each FP8 scale (``k_scale``, ``v_scale``,
``kv_scale``) travels as a pair ``(Optional[Tensor], Optional[float])`` (both None: not given) and is
rebuilt before calling the eager function, which keeps every check in one place (xqa_jit.api).
The real implementations call ``xqa_jit.api.xqa`` / ``xqa_mla`` at run time, when
``torch.compiler.is_compiling()`` is False. The fake (meta) implementations only allocate outputs:
out like q (xqa) or (B, Hq, v_head_dim) (xqa_mla), lse float32 of shape q.shape[:-1].
Argument errors therefore surface when the compiled function runs, with the eager messages.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import api as _api

__all__ = ["xqa_op_call", "xqa_mla_op_call"]

_NO_LSE = (0,)


def _dispatch(op, op_out, out, args, return_lse):
    """Call the functional op (fresh output) or its out= variant; the public return convention."""
    if out is None:
        res, lse = op(*args)
    else:
        lse = op_out(out, *args)
        res = out
    return (res, lse) if return_lse else res


def _split_scale(name, value):
    """float-or-tensor scale -> (Optional[Tensor], Optional[float])."""
    if value is None:
        return None, None
    if isinstance(value, torch.Tensor):
        return value, None
    try:
        return None, float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or a float32 tensor, got "
                        f"{type(value).__name__}") from None


def _join_scale(t: Optional[Tensor], f: Optional[float]):
    return t if t is not None else f


def _empty_lse(q: Tensor) -> Tensor:
    return q.new_empty(_NO_LSE, dtype=torch.float32)


def _fake_lse(q: Tensor, return_lse: bool) -> Tensor:
    if not return_lse:
        return _empty_lse(q)
    return q.new_empty(q.shape[:-1], dtype=torch.float32)


# ----------------------------------------------------------------------------------------- xqa


def _xqa_eager(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
               kv_layout, sm_scale, pos_encoding_mode, rope_scale, rope_theta, sliding_window_size,
               sinks, k_scale_t, k_scale_f, v_scale_t, v_scale_f, kv_scale_t, kv_scale_f, spec_mask,
               out, return_lse):
    res = _api.xqa(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                   kv_layout=kv_layout, sm_scale=sm_scale, pos_encoding_mode=pos_encoding_mode,
                   rope_scale=rope_scale, rope_theta=rope_theta,
                   sliding_window_size=sliding_window_size, sinks=sinks,
                   k_scale=_join_scale(k_scale_t, k_scale_f),
                   v_scale=_join_scale(v_scale_t, v_scale_f),
                   kv_scale=_join_scale(kv_scale_t, kv_scale_f), spec_mask=spec_mask, out=out,
                   return_lse=return_lse)
    return res if return_lse else (res, _empty_lse(q))


@torch.library.custom_op("xqa_jit::xqa", mutates_args=())
def _xqa_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
            head_dim: Optional[int], page_size: Optional[int], num_kv_heads: Optional[int],
            kv_layout: str, sm_scale: Optional[float], pos_encoding_mode: str, rope_scale: float,
            rope_theta: float, sliding_window_size: int, sinks: Optional[Tensor],
            k_scale_t: Optional[Tensor], k_scale_f: Optional[float], v_scale_t: Optional[Tensor],
            v_scale_f: Optional[float], kv_scale_t: Optional[Tensor], kv_scale_f: Optional[float],
            spec_mask: Optional[Tensor], return_lse: bool) -> Tuple[Tensor, Tensor]:
    return _xqa_eager(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                      kv_layout, sm_scale, pos_encoding_mode, rope_scale, rope_theta,
                      sliding_window_size, sinks, k_scale_t, k_scale_f, v_scale_t, v_scale_f,
                      kv_scale_t, kv_scale_f, spec_mask, None, return_lse)


@_xqa_op.register_fake
def _xqa_fake(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
              kv_layout, sm_scale, pos_encoding_mode, rope_scale, rope_theta, sliding_window_size,
              sinks, k_scale_t, k_scale_f, v_scale_t, v_scale_f, kv_scale_t, kv_scale_f, spec_mask,
              return_lse):
    return q.new_empty(q.shape), _fake_lse(q, return_lse)


@torch.library.custom_op("xqa_jit::xqa_out", mutates_args=("out",))
def _xqa_out_op(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                seq_lens: Tensor, head_dim: Optional[int], page_size: Optional[int],
                num_kv_heads: Optional[int], kv_layout: str, sm_scale: Optional[float],
                pos_encoding_mode: str, rope_scale: float, rope_theta: float,
                sliding_window_size: int, sinks: Optional[Tensor], k_scale_t: Optional[Tensor],
                k_scale_f: Optional[float], v_scale_t: Optional[Tensor], v_scale_f: Optional[float],
                kv_scale_t: Optional[Tensor], kv_scale_f: Optional[float],
                spec_mask: Optional[Tensor], return_lse: bool) -> Tensor:
    _, lse = _xqa_eager(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size,
                        num_kv_heads, kv_layout, sm_scale, pos_encoding_mode, rope_scale,
                        rope_theta, sliding_window_size, sinks, k_scale_t, k_scale_f, v_scale_t,
                        v_scale_f, kv_scale_t, kv_scale_f, spec_mask, out, return_lse)
    return lse


@_xqa_out_op.register_fake
def _xqa_out_fake(out, q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size,
                  num_kv_heads, kv_layout, sm_scale, pos_encoding_mode, rope_scale, rope_theta,
                  sliding_window_size, sinks, k_scale_t, k_scale_f, v_scale_t, v_scale_f,
                  kv_scale_t, kv_scale_f, spec_mask, return_lse):
    return _fake_lse(q, return_lse)


def xqa_op_call(q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                kv_layout, sm_scale, pos_encoding_mode, rope_scale, rope_theta,
                sliding_window_size, sinks, k_scale, v_scale, kv_scale, spec_mask, out,
                return_lse):
    """xqa through the custom ops; same arguments and return value as :func:`xqa_jit.xqa`."""
    if sliding_window_size is None:
        sliding_window_size = -1
    kst, ksf = _split_scale("k_scale", k_scale)
    vst, vsf = _split_scale("v_scale", v_scale)
    kvt, kvf = _split_scale("kv_scale", kv_scale)
    args = (q, k_cache, v_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
            kv_layout, None if sm_scale is None else float(sm_scale), pos_encoding_mode,
            float(rope_scale), float(rope_theta), sliding_window_size, sinks, kst, ksf, vst, vsf,
            kvt, kvf, spec_mask, bool(return_lse))
    return _dispatch(torch.ops.xqa_jit.xqa, torch.ops.xqa_jit.xqa_out, out, args, return_lse)


# ------------------------------------------------------------------------------------- xqa_mla


def _mla_eager(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads, v_head_dim,
               sm_scale, kv_scale_t, kv_scale_f, out, return_lse):
    res = _api.xqa_mla(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                       v_head_dim=v_head_dim, sm_scale=sm_scale,
                       kv_scale=_join_scale(kv_scale_t, kv_scale_f), out=out,
                       return_lse=return_lse)
    return res if return_lse else (res, _empty_lse(q))


def _mla_v_dim(q, kv_cache, v_head_dim):
    """Width of xqa_mla's output, by the rule of its docstring."""
    dk = q.shape[-1]
    width = kv_cache.shape[-1]
    if v_head_dim is not None:
        return v_head_dim
    if width == dk:
        if dk == 576:
            return 512
        raise ValueError(f"xqa_mla: v_head_dim must be given for a latent cache of width {width} "
                         f"(it defaults to 512 only for 576-wide rows)")
    return width - dk


@torch.library.custom_op("xqa_jit::xqa_mla", mutates_args=())
def _mla_op(q: Tensor, kv_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
            head_dim: Optional[int], page_size: Optional[int], num_kv_heads: Optional[int],
            v_head_dim: Optional[int], sm_scale: Optional[float], kv_scale_t: Optional[Tensor],
            kv_scale_f: Optional[float], return_lse: bool) -> Tuple[Tensor, Tensor]:
    return _mla_eager(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                      v_head_dim, sm_scale, kv_scale_t, kv_scale_f, None, return_lse)


@_mla_op.register_fake
def _mla_fake(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads, v_head_dim,
              sm_scale, kv_scale_t, kv_scale_f, return_lse):
    dv = _mla_v_dim(q, kv_cache, v_head_dim)
    return q.new_empty(tuple(q.shape[:-1]) + (dv,)), _fake_lse(q, return_lse)


@torch.library.custom_op("xqa_jit::xqa_mla_out", mutates_args=("out",))
def _mla_out_op(out: Tensor, q: Tensor, kv_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
                head_dim: Optional[int], page_size: Optional[int], num_kv_heads: Optional[int],
                v_head_dim: Optional[int], sm_scale: Optional[float],
                kv_scale_t: Optional[Tensor], kv_scale_f: Optional[float],
                return_lse: bool) -> Tensor:
    _, lse = _mla_eager(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                        v_head_dim, sm_scale, kv_scale_t, kv_scale_f, out, return_lse)
    return lse


@_mla_out_op.register_fake
def _mla_out_fake(out, q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                  v_head_dim, sm_scale, kv_scale_t, kv_scale_f, return_lse):
    return _fake_lse(q, return_lse)


def xqa_mla_op_call(q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads,
                    v_head_dim, sm_scale, kv_scale, out, return_lse):
    """xqa_mla through the custom ops; same arguments and return value as :func:`xqa_jit.xqa_mla`."""
    kst, ksf = _split_scale("kv_scale", kv_scale)
    args = (q, kv_cache, page_table, seq_lens, head_dim, page_size, num_kv_heads, v_head_dim,
            None if sm_scale is None else float(sm_scale), kst, ksf, bool(return_lse))
    return _dispatch(torch.ops.xqa_jit.xqa_mla, torch.ops.xqa_jit.xqa_mla_out, out, args,
                     return_lse)
