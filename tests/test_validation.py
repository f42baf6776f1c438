"""Argument checking of xqa_jit.xqa / xqa_mla: every bad input raises before anything is launched.

Each case asserts the exception type (TypeError for a wrong dtype or Python type, ValueError for a
wrong shape, device or value) and that the message names the argument (and both sizes / dtypes where
two disagree).

Where it runs:

- ``test_bad_input[cuda-...]`` / ``test_good_input_reaches_launch[cuda-...]``: on a GPU, real CUDA
  tensors, with ``torch.cuda.set_sync_debug_mode("error")`` on, so a check that synchronised with the
  GPU (``.item()``, ``.tolist()``, a device-to-host copy) would fail the case instead of passing it.
- ``...[cpu-...]``: the same battery on CPU tensors everywhere (CI without a GPU). The two
  CUDA-only steps are patched: ``xqa_jit.api._is_device_ok`` (the "q must be a CUDA tensor" check)
  accepts CPU, and ``_dev_index`` / ``build.device_arch`` answer as for device 0, sm_90a. The
  "other device" of device-mismatch cases is ``meta`` there (``cpu`` on the GPU run). Nothing can
  show on a CPU that a check does not synchronise: that is only tested by the GPU run.
- In both, ``xqa_jit.build.get_module`` is replaced by a sentinel raising :class:`ReachedLaunch`
  (and the per-process kernel / call-plan memos emptied), so a bad input must fail *before* the kernel is looked
  up, and a good input must get as far as the sentinel: the battery cannot pass by failing late.
- ``test_cpu_*``: the unpatched checks that need no CUDA at all (CPU tensors rejected, non-tensors).
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import xqa_jit
from helpers import HAS_CUDA
from xqa_jit import api as _api
from xqa_jit import build as _build

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# Base problem: B=2, Hq=8, Hkv=2 (group 4), D=128, P=16, M=4 pages per request, N=9 pages, fp16, NHD.
B, HQ, HKV, D, P, M, N = 2, 8, 2, 128, 16, 4, 9


class ReachedLaunch(Exception):
    """Raised by the patched get_module: every argument check has passed."""


class Env:
    """Where the battery runs: the device of the inputs and a different one for mismatch cases."""

    def __init__(self, dev: str, other: str, forbid_sync: bool = False):
        self.dev = torch.device(dev)
        self.other = torch.device(other)
        self.forbid_sync = forbid_sync

    @contextlib.contextmanager
    def no_sync(self):
        """On a GPU: any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode)."""
        if not self.forbid_sync:
            yield
            return
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(prev)

    # ------------------------------------------------------------------ builders
    def t(self, shape, dtype=F16, device=None):
        return torch.zeros(shape, dtype=dtype, device=device or self.dev)

    def call(self, *, b=B, hq=HQ, hkv=HKV, d=D, p=P, m=M, n=N, dtype=F16, kv_dtype=None,
             layout="NHD", lq=None, **kw):
        """(args, kwargs) of a valid xqa call; kwargs in kw are passed through (and may be bad)."""
        kv_dtype = kv_dtype or dtype
        page = (p, hkv, d) if layout == "NHD" else (hkv, p, d)
        q = self.t((b, hq, d) if lq is None else (b, lq, hq, d), dtype)
        k = self.t((n,) + page, kv_dtype)
        v = self.t((n,) + page, kv_dtype)
        pt = torch.arange(b * m, dtype=torch.int32, device=self.dev).reshape(b, m) % n
        sl = torch.full((b,), min(m * p, 37), dtype=torch.int32, device=self.dev)
        kw.setdefault("kv_layout", layout)
        return [q, k, v, pt, sl], kw

    def mla_call(self, *, b=B, hq=HQ, dk=D, width=2 * D, hkv=1, dtype=F16, **kw):
        """(args, kwargs) of a valid seed-form xqa_mla call: kv_cache (N, P, Hkv, 2*D) = [K | V]."""
        q = self.t((b, hq, dk), dtype)
        kv = self.t((N, P, hkv, width), dtype) if hkv else self.t((N, P, width), dtype)
        pt = torch.arange(b * M, dtype=torch.int32, device=self.dev).reshape(b, M) % N
        sl = torch.full((b,), 37, dtype=torch.int32, device=self.dev)
        return [q, kv, pt, sl], kw


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def env(request, monkeypatch):
    """The battery's environment: launch replaced by a sentinel; CPU made acceptable on "cpu"."""
    monkeypatch.delenv("XQA_JIT_DEBUG", raising=False)
    # fresh memos: a kernel, plan or env flag cached by an earlier test must not skip any check
    monkeypatch.setattr(_api, "_SPECS", {})
    for memo in ("_CALLS", "_ENV"):
        if hasattr(_api, memo):
            monkeypatch.setattr(_api, memo, {})

    def _sentinel(spec, arch=None):
        raise ReachedLaunch(spec.name)

    monkeypatch.setattr(_build, "get_module", _sentinel)
    if request.param == "cpu":
        monkeypatch.setattr(_api, "_is_device_ok", lambda t: True)
        monkeypatch.setattr(_api, "_dev_index", lambda t: 0)
        monkeypatch.setattr(_build, "device_arch", lambda dev: "9.0a")
        yield Env("cpu", "meta")
        return
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    yield Env("cuda", "cpu", forbid_sync=True)


# ---------------------------------------------------------------------------------------- cases
# Each case: (id, builder(env) -> (fn, args, kwargs), exception type, fragments the message holds).
# Fragments may be callables of env (for device names).


def _case(fn, call, kw):
    """A case on fn built from Env.<call>(**kw) and then edited by `edit(env, args, kwargs)`."""
    edit = kw.pop("edit", None)

    def build(e):
        args, kwargs = getattr(e, call)(**kw)
        if edit is not None:
            edit(e, args, kwargs)
        return fn, args, kwargs

    return build


def X(**kw):
    """A case on xqa (Env.call)."""
    return _case(xqa_jit.xqa, "call", kw)


def XM(**kw):
    """A case on xqa_mla (Env.mla_call)."""
    return _case(xqa_jit.xqa_mla, "mla_call", kw)


def setarg(i, make):
    def edit(e, args, kwargs):
        args[i] = make(e, args)
    return edit


def setkw(name, make):
    def edit(e, args, kwargs):
        kwargs[name] = make(e, args)
    return edit


def other_dev(e):
    return str(e.other)


def noncontig_last(e, shape, dtype=F16, device=None):
    """A tensor of `shape` whose last dimension has stride 2."""
    return e.t(tuple(shape) + (2,), dtype, device)[..., 0]


Q, K, V, PT, SL = range(5)

TYPE_CASES = [
    # q
    ("q_fp32", X(dtype=F32, kv_dtype=F16), TypeError, ["q", "float16", "bfloat16", "float32"]),
    ("q_fp8", X(edit=setarg(Q, lambda e, a: e.t(a[Q].shape, E4M3))), TypeError,
     ["q", "float8_e4m3fn"]),
    ("q_not_tensor", X(edit=setarg(Q, lambda e, a: a[Q].tolist())), TypeError, ["q", "Tensor", "list"]),
    # caches
    ("k_not_tensor", X(edit=setarg(K, lambda e, a: "cache")), TypeError, ["k_cache", "str"]),
    ("v_not_tensor", X(edit=setarg(V, lambda e, a: None)), TypeError, ["v_cache", "NoneType"]),
    ("cache_bf16_q_fp16", X(kv_dtype=BF16), TypeError, ["k_cache", "float16", "bfloat16"]),
    ("cache_fp16_q_bf16", X(dtype=BF16, kv_dtype=F16), TypeError, ["k_cache", "bfloat16", "float16"]),
    ("cache_fp32", X(kv_dtype=F32), TypeError, ["k_cache", "float32"]),
    ("v_dtype_differs", X(edit=setarg(V, lambda e, a: e.t(a[V].shape, BF16))), TypeError,
     ["v_cache", "k_cache", "bfloat16", "float16"]),
    ("v_fp8_differs", X(kv_dtype=E4M3, edit=setarg(V, lambda e, a: e.t(a[V].shape, E5M2))), TypeError,
     ["v_cache", "k_cache", "float8_e5m2", "float8_e4m3fn"]),
    ("v_fp16_k_fp8", X(kv_dtype=E4M3, edit=setarg(V, lambda e, a: e.t(a[V].shape, F16))), TypeError,
     ["v_cache", "float16", "float8_e4m3fn"]),
    # page table, lengths
    ("page_table_int64", X(edit=setarg(PT, lambda e, a: a[PT].long())), TypeError,
     ["page_table", "int32", "int64"]),
    ("page_table_list", X(edit=setarg(PT, lambda e, a: a[PT].tolist())), TypeError, ["page_table", "list"]),
    ("seq_lens_int64", X(edit=setarg(SL, lambda e, a: a[SL].long())), TypeError,
     ["seq_lens", "int32", "int64"]),
    ("seq_lens_float", X(edit=setarg(SL, lambda e, a: a[SL].float())), TypeError,
     ["seq_lens", "int32", "float32"]),
    ("seq_lens_list", X(edit=setarg(SL, lambda e, a: [37, 37])), TypeError, ["seq_lens", "list"]),
    # sinks
    ("sinks_int", X(sinks=None, edit=setkw("sinks", lambda e, a: e.t((HQ,), torch.int32))), TypeError,
     ["sinks", "float", "int32"]),
    ("sinks_list", X(sinks=[0.0] * HQ), TypeError, ["sinks", "list"]),
    ("sink_keys_dtype", X(edit=setkw("sinks", lambda e, a: e.t((2, HKV, D), BF16))), TypeError,
     ["sinks", "float16", "bfloat16"]),
    # scales
    ("k_scale_fp16", X(kv_dtype=E4M3, edit=setkw("k_scale", lambda e, a: e.t((1,), F16))), TypeError,
     ["k_scale", "float32", "float16"]),
    ("v_scale_int", X(kv_dtype=E4M3, edit=setkw("v_scale", lambda e, a: e.t((HKV,), torch.int32))),
     TypeError, ["v_scale", "float32", "int32"]),
    ("v_scale_str", X(kv_dtype=E4M3, v_scale="abc"), TypeError, ["v_scale", "str"]),
    ("kv_scale_list", X(kv_dtype=E4M3, kv_scale=[1.0]), TypeError, ["kv_scale", "list"]),
    ("kv_scale_fp64", X(kv_dtype=E4M3, edit=setkw("kv_scale", lambda e, a: e.t((1,), torch.float64))),
     TypeError, ["kv_scale", "float32", "float64"]),
    # spec_mask, out
    ("spec_mask_uint8", X(lq=4, edit=setkw("spec_mask", lambda e, a: e.t((B, 4, 4), torch.uint8))),
     TypeError, ["spec_mask", "bool", "uint8"]),
    ("spec_mask_list", X(lq=2, spec_mask=[[[True, False], [True, True]]] * B), TypeError,
     ["spec_mask", "list"]),
    ("out_fp32", X(edit=setkw("out", lambda e, a: e.t(a[Q].shape, F32))), TypeError,
     ["out", "float16", "float32"]),
    ("out_bf16", X(edit=setkw("out", lambda e, a: e.t(a[Q].shape, BF16))), TypeError,
     ["out", "float16", "bfloat16"]),
    ("out_list", X(out=[]), TypeError, ["out", "list"]),
    # scalars
    ("sm_scale_tensor", X(edit=setkw("sm_scale", lambda e, a: e.t((), F32))), TypeError,
     ["sm_scale", "Tensor"]),
    ("sm_scale_str", X(sm_scale="0.1"), TypeError, ["sm_scale", "str"]),
    ("rope_theta_str", X(pos_encoding_mode="ROPE_LLAMA", rope_theta="1e4"), TypeError,
     ["rope_theta", "str"]),
]

VALUE_CASES = [
    # devices
    ("k_other_device", X(edit=setarg(K, lambda e, a: a[K].to(e.other))), ValueError,
     ["k_cache", other_dev]),
    ("v_other_device", X(edit=setarg(V, lambda e, a: a[V].to(e.other))), ValueError,
     ["v_cache", other_dev]),
    ("page_table_other_device", X(edit=setarg(PT, lambda e, a: a[PT].to(e.other))), ValueError,
     ["page_table", other_dev]),
    ("seq_lens_other_device", X(edit=setarg(SL, lambda e, a: a[SL].to(e.other))), ValueError,
     ["seq_lens", other_dev]),
    ("sinks_other_device", X(edit=setkw("sinks", lambda e, a: e.t((HQ,), F32, e.other))), ValueError,
     ["sinks", other_dev]),
    ("k_scale_other_device", X(kv_dtype=E4M3, edit=setkw("k_scale", lambda e, a: e.t((1,), F32, e.other))),
     ValueError, ["k_scale", other_dev]),
    ("v_scale_other_device",
     X(kv_dtype=E4M3, edit=setkw("v_scale", lambda e, a: e.t((HKV,), F32, e.other))), ValueError,
     ["v_scale", other_dev]),
    ("kv_scale_other_device",
     X(kv_dtype=E4M3, edit=setkw("kv_scale", lambda e, a: e.t((1,), F32, e.other))), ValueError,
     ["kv_scale", other_dev]),
    ("spec_mask_other_device",
     X(lq=4, edit=setkw("spec_mask", lambda e, a: e.t((B, 4, 4), torch.bool, e.other))), ValueError,
     ["spec_mask", other_dev]),
    ("out_other_device", X(edit=setkw("out", lambda e, a: e.t(a[Q].shape, F16, e.other))), ValueError,
     ["out", other_dev]),
    # ranks
    ("q_2d", X(edit=setarg(Q, lambda e, a: e.t((B, HQ * D)))), ValueError, ["q", "(B, Hq, D)", "(2, 1024)"]),
    ("q_5d", X(edit=setarg(Q, lambda e, a: e.t((B, 1, 1, HQ, D)))), ValueError,
     ["q", "(B, Lq, Hq, D)", "(2, 1, 1, 8, 128)"]),
    ("k_3d", X(edit=setarg(K, lambda e, a: e.t((N, P, HKV * D)))), ValueError, ["k_cache", "4-D", "(9, 16, 256)"]),
    ("v_5d", X(edit=setarg(V, lambda e, a: e.t((N, P, HKV, D, 1)))), ValueError, ["v_cache", "4-D"]),
    ("page_table_1d", X(edit=setarg(PT, lambda e, a: a[PT].reshape(-1))), ValueError,
     ["page_table", "batch=2", "(8,)"]),
    ("seq_lens_2d", X(edit=setarg(SL, lambda e, a: a[SL].reshape(B, 1))), ValueError,
     ["seq_lens", "(2,)", "(2, 1)"]),
    # shapes that disagree
    ("page_table_batch", X(edit=setarg(PT, lambda e, a: e.t((B + 1, M), torch.int32))), ValueError,
     ["page_table", "batch=2", "(3, 4)"]),
    ("page_table_no_columns", X(edit=setarg(PT, lambda e, a: e.t((B, 0), torch.int32))), ValueError,
     ["page_table", "(2, 0)"]),
    ("seq_lens_batch", X(edit=setarg(SL, lambda e, a: e.t((B + 1,), torch.int32))), ValueError,
     ["seq_lens", "(2,)", "(3,)"]),
    ("kv_shapes_differ", X(edit=setarg(V, lambda e, a: e.t((N + 1, P, HKV, D)))), ValueError,
     ["v_cache", "k_cache", "(10, 16, 2, 128)", "(9, 16, 2, 128)"]),
    ("cache_head_dim_differs", X(edit=lambda e, a, kw: a.__setitem__(slice(1, 3), [e.t((N, P, HKV, 64))] * 2)),
     ValueError, ["k_cache", "64", "128"]),
    ("hq_not_multiple", X(hq=6, hkv=4), ValueError, ["num_qo_heads", "(6)", "num_kv_heads", "(4)"]),
    ("group_over_64", X(hq=128, hkv=1), ValueError, ["num_kv_heads", "64", "128"]),
    ("head_dim_arg", X(edit=lambda e, a, kw: a.append(64)), ValueError, ["head_dim=64", "128"]),
    ("page_size_arg", X(edit=lambda e, a, kw: a.extend([None, 32])), ValueError, ["page_size=32", "16"]),
    ("page_size_arg_hnd", X(layout="HND", edit=lambda e, a, kw: a.extend([None, 2])), ValueError,
     ["page_size=2", "16", "HND"]),
    ("num_kv_heads_arg", X(edit=lambda e, a, kw: a.extend([None, None, 4])), ValueError,
     ["num_kv_heads=4", "2"]),
    ("num_kv_heads_arg_kw", X(num_kv_heads=1, head_dim=D, page_size=P), ValueError, ["num_kv_heads=1", "2"]),
    # strides, alignment
    ("q_last_dim_strided", X(edit=setarg(Q, lambda e, a: noncontig_last(e, a[Q].shape))), ValueError,
     ["q", "last dimension", "contiguous"]),
    ("k_last_dim_strided", X(edit=setarg(K, lambda e, a: noncontig_last(e, a[K].shape))), ValueError,
     ["k_cache", "last dimension", "contiguous"]),
    ("v_last_dim_strided", X(edit=setarg(V, lambda e, a: noncontig_last(e, a[V].shape))), ValueError,
     ["v_cache", "last dimension", "contiguous"]),
    ("out_last_dim_strided", X(edit=setkw("out", lambda e, a: noncontig_last(e, a[Q].shape))), ValueError,
     ["out", "last dimension", "contiguous"]),
    ("page_table_last_dim_strided",
     X(edit=setarg(PT, lambda e, a: noncontig_last(e, a[PT].shape, torch.int32))), ValueError,
     ["page_table", "contiguous"]),
    ("seq_lens_strided", X(edit=setarg(SL, lambda e, a: noncontig_last(e, (B,), torch.int32))), ValueError,
     ["seq_lens", "contiguous"]),
    ("k_scale_strided",
     X(kv_dtype=E4M3, edit=setkw("k_scale", lambda e, a: noncontig_last(e, (HKV,), F32))), ValueError,
     ["k_scale", "contiguous"]),
    ("q_misaligned", X(edit=setarg(Q, lambda e, a: e.t(B * HQ * D + 8)[1:1 + B * HQ * D].view(B, HQ, D))),
     ValueError, ["q", "16-byte"]),
    ("k_row_stride_misaligned",
     X(edit=lambda e, a, kw: a.__setitem__(slice(1, 3), [e.t((N, P, HKV, D + 1))[..., :D]] * 2)),
     ValueError, ["k_cache", "strides", "16 bytes"]),
    ("out_misaligned",
     X(edit=setkw("out", lambda e, a: e.t(B * HQ * D + 8)[1:1 + B * HQ * D].view(B, HQ, D))),
     ValueError, ["out", "16-byte"]),
    # sizes the kernels do not support
    ("head_dim_96", X(d=96), ValueError, ["head_dim", "96"]),
    ("head_dim_32", X(d=32), ValueError, ["head_dim", "32"]),
    ("page_size_3", X(p=3), ValueError, ["page_size", "power of two", "3"]),
    ("page_size_12_hnd", X(p=12, layout="HND"), ValueError, ["page_size", "power of two", "12"]),
    ("lq_17", X(lq=17), ValueError, ["Lq", "16", "17"]),
    ("lq_0", X(lq=0), ValueError, ["Lq", "0"]),
    ("batch_0", X(b=0), ValueError, ["batch", "0"]),
    # sinks
    ("sinks_per_head_shape", X(edit=setkw("sinks", lambda e, a: e.t((HQ + 1,), F32))), ValueError,
     ["sinks", "(8,)", "(9,)"]),
    ("sinks_per_kv_head", X(edit=setkw("sinks", lambda e, a: e.t((HKV,), F32))), ValueError,
     ["sinks", "(8,)", "(2,)"]),
    ("sinks_2d", X(edit=setkw("sinks", lambda e, a: e.t((1, HQ), F32))), ValueError, ["sinks", "(1, 8)"]),
    ("sink_keys_heads", X(edit=setkw("sinks", lambda e, a: e.t((2, HKV + 1, D)))), ValueError,
     ["sinks", "num_kv_heads=2", "(2, 3, 128)"]),
    ("sink_keys_dim", X(edit=setkw("sinks", lambda e, a: e.t((2, HKV, 64)))), ValueError,
     ["sinks", "head_dim=128", "(2, 2, 64)"]),
    # scales
    ("k_scale_shape", X(kv_dtype=E4M3, edit=setkw("k_scale", lambda e, a: e.t((3,), F32))), ValueError,
     ["k_scale", "(2,)", "(3,)"]),
    ("v_scale_2d", X(kv_dtype=E5M2, edit=setkw("v_scale", lambda e, a: e.t((1, 1), F32))), ValueError,
     ["v_scale", "(1, 1)"]),
    ("kv_scale_shape", X(kv_dtype=E4M3, edit=setkw("kv_scale", lambda e, a: e.t((HQ,), F32))), ValueError,
     ["kv_scale", "(2,)", "(8,)"]),
    ("kv_scale_and_k_scale", X(kv_dtype=E4M3, kv_scale=1.0, k_scale=1.0), ValueError, ["kv_scale", "k_scale"]),
    ("kv_scale_and_v_scale", X(kv_dtype=E4M3, kv_scale=1.0, v_scale=2.0), ValueError, ["kv_scale", "v_scale"]),
    # spec_mask
    ("spec_mask_shape", X(lq=4, edit=setkw("spec_mask", lambda e, a: e.t((B, 4, 5), torch.bool))), ValueError,
     ["spec_mask", "(2, 4, 4)", "(2, 4, 5)"]),
    ("spec_mask_batch", X(lq=4, edit=setkw("spec_mask", lambda e, a: e.t((1, 4, 4), torch.bool))),
     ValueError, ["spec_mask", "(2, 4, 4)", "(1, 4, 4)"]),
    ("spec_mask_lq1", X(edit=setkw("spec_mask", lambda e, a: e.t((B, 1, 1), torch.bool))), ValueError,
     ["spec_mask", "Lq"]),
    # out
    ("out_shape", X(edit=setkw("out", lambda e, a: e.t((B, HQ, D // 2)))), ValueError,
     ["out", "(2, 8, 128)", "(2, 8, 64)"]),
    ("out_shape_lq", X(lq=3, edit=setkw("out", lambda e, a: e.t((B, HQ, D)))), ValueError,
     ["out", "(2, 3, 8, 128)", "(2, 8, 128)"]),
    # options
    ("kv_layout_lower", X(kv_layout="nhd"), ValueError, ["kv_layout", "'nhd'"]),
    ("kv_layout_bad", X(kv_layout="NDH"), ValueError, ["kv_layout", "'NDH'"]),
    ("pos_encoding_bad", X(pos_encoding_mode="ROPE"), ValueError, ["pos_encoding_mode", "'ROPE'"]),
    ("pos_encoding_lower", X(pos_encoding_mode="rope_llama"), ValueError, ["pos_encoding_mode", "'rope_llama'"]),
    ("pos_encoding_none_obj", X(pos_encoding_mode=None), ValueError, ["pos_encoding_mode", "None"]),
    ("window_0", X(sliding_window_size=0), ValueError, ["sliding_window_size", "0"]),
    ("window_minus_2", X(sliding_window_size=-2), ValueError, ["sliding_window_size", "-2"]),
    ("window_float", X(sliding_window_size=128.0), ValueError, ["sliding_window_size", "128.0"]),
    ("rope_theta_0", X(pos_encoding_mode="ROPE_LLAMA", rope_theta=0.0), ValueError, ["rope_theta", "0.0"]),
    ("rope_scale_neg", X(pos_encoding_mode="ROPE_LLAMA", rope_scale=-1.0), ValueError, ["rope_scale", "-1.0"]),
]

MLA_CASES = [
    ("mla_q_not_tensor", XM(edit=setarg(0, lambda e, a: None)), TypeError, ["q", "kv_cache"]),
    ("mla_kv_not_tensor", XM(edit=setarg(1, lambda e, a: [])), TypeError, ["kv_cache"]),
    ("mla_q_4d", XM(edit=setarg(0, lambda e, a: e.t((B, 1, HQ, D)))), ValueError,
     ["xqa_mla", "q", "(2, 1, 8, 128)"]),
    ("mla_head_dim_arg", XM(head_dim=64), ValueError, ["head_dim=64", "128"]),
    ("mla_v_head_dim_misfit", XM(v_head_dim=64), ValueError, ["v_head_dim=64", "256", "128"]),
    ("mla_kv_dims_differ", XM(dk=64, width=256), ValueError, ["v_head_dim", "192", "64"]),
    ("mla_kv_3d", XM(hkv=0), ValueError, ["cache", "(N, P, Hkv, 2*D)", "(9, 16, 256)"]),
    ("mla_kv_dtype", XM(edit=setarg(1, lambda e, a: a[1].to(BF16))), TypeError,
     ["k_cache", "float16", "bfloat16"]),
    ("mla_page_table_int64", XM(edit=setarg(2, lambda e, a: a[2].long())), TypeError,
     ["page_table", "int32", "int64"]),
    ("mla_out_shape", XM(edit=setkw("out", lambda e, a: e.t((B, HQ, 2 * D)))), ValueError,
     ["out", "(2, 8, 128)", "(2, 8, 256)"]),
    ("mla_kv_scale_shape",
     XM(edit=lambda e, a, kw: (a.__setitem__(1, a[1].to(E4M3)), kw.__setitem__("kv_scale", e.t((4,), F32)))),
     ValueError, ["kv_scale", "(1,)", "(4,)"]),
]

BAD = TYPE_CASES + VALUE_CASES + MLA_CASES


def _frag(f, e):
    return f(e) if callable(f) else f


def _check_raises(e, build, exc, frags):
    fn, args, kwargs = build(e)
    with pytest.raises(Exception) as info, e.no_sync():
        fn(*args, **kwargs)
    err = info.value
    assert not isinstance(err, ReachedLaunch), "the bad input reached the kernel launch unchecked"
    assert type(err) is exc, f"expected {exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    for f in frags:
        f = _frag(f, e)
        assert f in msg, f"message {msg!r} does not mention {f!r}"


def test_case_ids_unique():
    ids = [c[0] for c in BAD]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(env, case):
    _, build, exc, frags = case
    _check_raises(env, build, exc, frags)


# Valid calls covering every accepted form: each must pass every check and reach the launch.
def _shared_pool(e, a, kw):
    pool = e.t((N, 2, P, HKV, D))
    a[K], a[V] = pool[:, 0], pool[:, 1]


def _qkv_view(e, a, kw):
    # q sliced out of a fused (B, Hq + 2 * Hkv, D) projection: strided, last dim contiguous
    a[Q] = e.t((B, HQ + 2 * HKV, D))[:, :HQ]


GOOD = [
    ("base", X()),
    ("bf16_hnd_p1", X(dtype=BF16, layout="HND", p=1, m=64)),
    ("p256", X(p=256, m=1)),
    ("d64", X(d=64)),
    ("d256", X(d=256)),
    ("mha", X(hq=4, hkv=4)),
    ("group64", X(hq=64, hkv=1)),
    ("mqa_hnd", X(hq=16, hkv=1, layout="HND")),
    ("size_args", X(head_dim=D, page_size=P, num_kv_heads=HKV)),
    ("size_args_positional", X(edit=lambda e, a, kw: a.extend([D, P, HKV]))),
    ("v_is_k", X(edit=lambda e, a, kw: a.__setitem__(V, a[K]))),
    ("shared_pool", X(edit=_shared_pool)),
    ("q_strided_view", X(edit=_qkv_view)),
    ("fp8_e4m3_float", X(kv_dtype=E4M3, kv_scale=0.5)),
    ("fp8_e5m2_tensors", X(kv_dtype=E5M2, edit=lambda e, a, kw: kw.update(
        k_scale=e.t((HKV,), F32), v_scale=e.t((1,), F32)))),
    ("fp8_bf16_kv_tensor", X(dtype=BF16, kv_dtype=E4M3, edit=setkw("kv_scale", lambda e, a: e.t((1,), F32)))),
    ("fp16_with_scales", X(k_scale=1.0, v_scale=1.0)),
    ("sinks_fp32", X(edit=setkw("sinks", lambda e, a: e.t((HQ,), F32)))),
    ("sinks_bf16_upcast", X(edit=setkw("sinks", lambda e, a: e.t((HQ,), BF16)))),
    ("sink_keys", X(edit=setkw("sinks", lambda e, a: e.t((3, HKV, D))))),
    ("lq1_4d", X(lq=1)),
    ("lq16_causal", X(lq=16)),
    ("tree", X(lq=4, edit=setkw("spec_mask", lambda e, a: e.t((B, 4, 4), torch.bool)))),
    ("window", X(sliding_window_size=1)),
    ("window_none", X(sliding_window_size=None)),
    ("rope", X(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=5e5)),
    ("out_and_lse", X(return_lse=True, edit=setkw("out", lambda e, a: e.t(a[Q].shape)))),
    ("sm_scale_int", X(sm_scale=1)),
    ("everything", X(lq=3, kv_dtype=E4M3, layout="HND", sliding_window_size=100,
                     pos_encoding_mode="ROPE_LLAMA", return_lse=True, edit=lambda e, a, kw: kw.update(
                         sinks=e.t((HQ,), F32), k_scale=e.t((HKV,), F32), v_scale=0.25,
                         spec_mask=e.t((B, 3, 3), torch.bool), out=e.t(a[Q].shape)))),
    ("mla_seed_form", XM()),
    ("mla_seed_form_gqa", XM(hkv=2, hq=8, v_head_dim=D, sm_scale=0.1, return_lse=True)),
]


@pytest.mark.parametrize("case", GOOD, ids=[c[0] for c in GOOD])
def test_good_input_reaches_launch(env, case):
    _, build = case
    fn, args, kwargs = build(env)
    with pytest.raises(ReachedLaunch), env.no_sync():
        fn(*args, **kwargs)


@pytest.mark.parametrize("case", BAD + [(g[0], g[1], None, None) for g in GOOD],
                         ids=[c[0] for c in BAD] + [g[0] for g in GOOD])
def test_cuda_tensor_required(case):
    """Unpatched, on CPU tensors: every call (bad ones included, unless a check on q fires first)
    stops at the CUDA check or earlier and never gets to build or launch anything."""
    _, build, exc, frags = case
    fn, args, kwargs = build(Env("cpu", "meta"))
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    if "CUDA" not in msg:  # rejected before the device check: must be the case's own error
        assert exc is not None and type(info.value) is exc, msg
        for f in frags:
            f = _frag(f, Env("cpu", "meta"))
            assert f in msg, f"message {msg!r} does not mention {f!r}"


def test_cpu_q_rejected():
    e = Env("cpu", "meta")
    args, kw = e.call()
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor, got device cpu"):
        xqa_jit.xqa(*args, **kw)
    args, kw = e.mla_call()
    with pytest.raises(ValueError, match=r"q must be a CUDA tensor, got device cpu"):
        xqa_jit.xqa_mla(*args, **kw)


def test_cpu_non_tensor_q():
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        xqa_jit.xqa([[0.0]], None, None, None, None)
    with pytest.raises(TypeError, match=r"q must be float16 or bfloat16, got torch.float32"):
        xqa_jit.xqa(torch.zeros(1, 8, 128), None, None, None, None)


@pytest.mark.gpu
def test_cuda_caches_on_cpu(cuda_device):
    """On a GPU: q on CUDA, everything else on the CPU (the common mistake), rejected by name."""
    e = Env("cpu", "meta")
    args, kw = e.call()
    args[Q] = args[Q].to(cuda_device)
    with pytest.raises(ValueError, match=r"k_cache is on cpu but q is on cuda"):
        xqa_jit.xqa(*args, **kw)


@pytest.mark.gpu
def test_latent_mla_validation(cuda_device):
    """The latent (DeepSeek) form, when its module is present: bad dtypes and widths are rejected.
    (GPU only: its checks live in xqa_jit.mla_latent, which this file does not patch.)"""
    if importlib.util.find_spec("xqa_jit.mla_latent") is None:
        pytest.skip("xqa_jit.mla_latent not present")
    env = Env("cuda", "cpu")
    q = env.t((B, 16, 576))
    kv = env.t((N, P, 576))
    pt = torch.zeros((B, M), dtype=torch.int32, device=env.dev)
    sl = torch.full((B,), 5, dtype=torch.int32, device=env.dev)
    with pytest.raises(TypeError):
        xqa_jit.xqa_mla(q, kv.to(BF16), pt, sl)
    with pytest.raises(TypeError):
        xqa_jit.xqa_mla(q, kv, pt.long(), sl)
    with pytest.raises(ValueError):
        xqa_jit.xqa_mla(env.t((B, 16, 192)), env.t((N, P, 192)), pt, sl)  # v_head_dim needed
