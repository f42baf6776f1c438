"""Frozen, hashable descriptions of one compiled kernel variant.

A spec holds exactly what changes the generated code; everything else (page size, window size,
scales, sequence lengths, strides, layout) is a run-time kernel argument. Each spec validates itself
with the same limits as the template's ``static_assert``s, so an unsupported variant fails in Python
with a clear message instead of in nvcc.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

Q_DTYPES = ("fp16", "bf16")
KV_DTYPES = ("fp16", "bf16", "e4m3", "e5m2")
FP8_DTYPES = ("e4m3", "e5m2")
HEAD_DIMS = (64, 128, 256)
SINK_FORMS = ("none", "per_head", "keys")
MAX_GROUP = 64
MAX_Q_LEN = 16

_CTYPES = {"fp16": "__half", "bf16": "__nv_bfloat16"}
_FP8_INTERP = {"e4m3": "__NV_E4M3", "e5m2": "__NV_E5M2"}


class SpecError(ValueError):
    """A kernel variant that xqa_jit does not support (raised before anything is built)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


class _SpecBase:
    """Shared behaviour: readable name, JSON round trip, template selection."""

    template: str = ""
    kind: str = ""

    def _dtype_args(self) -> dict:
        """Types shared by every template. With an FP8 cache the tensor cores run in f16: e4m3/e5m2
        convert to f16 exactly, and so does a bf16 q in the range attention uses; P then keeps
        11 bits instead of bf16's 8."""
        fp8 = self.kv_dtype in FP8_DTYPES
        mma = "fp16" if fp8 else self.q_dtype
        return {
            "spec_name": self.name,
            "q_ctype": _CTYPES[self.q_dtype],
            "mma_ctype": _CTYPES[mma],
            "mma_is_bf16": int(mma == "bf16"),
            "kv_fp8": int(fp8),
            "kv_ctype": "uint8_t" if fp8 else _CTYPES[self.kv_dtype],
            "fp8_interp": _FP8_INTERP.get(self.kv_dtype, "__NV_E4M3"),
            "debug": int(self.debug),
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "DecodeSpec | MlaSpec":
        d = dict(d)
        kind = d.pop("kind", "decode")
        cls = {"decode": DecodeSpec, "mla": MlaSpec}.get(kind)
        if cls is None:
            raise SpecError(f"unknown spec kind {kind!r}; expected 'decode' or 'mla'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)

    @staticmethod
    def parse(text: str) -> "DecodeSpec | MlaSpec":
        """A spec from its JSON form or from its readable name (``spec.name``)."""
        text = text.strip()
        if text.startswith("{"):
            return _SpecBase.from_dict(json.loads(text))
        return _parse_name(text)


@dataclass(frozen=True)
class DecodeSpec(_SpecBase):
    """One variant of the paged decode kernel (``xqa``).

    q_dtype: "fp16" | "bf16"; kv_dtype: q_dtype or "e4m3" | "e5m2"; head_dim: 64 | 128 | 256;
    group: query heads per KV head (1..64); q_len: query tokens per request (1..16);
    window: sliding window on; sinks: "none" | "per_head" | "keys"; rope: ROPE_LLAMA applied in
    the kernel; tree: an explicit speculative-decoding mask is read (else causal); debug: device-side
    checks of page ids and sequence lengths (XQA_JIT_DEBUG=1).
    """

    q_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    head_dim: int = 128
    group: int = 4
    q_len: int = 1
    window: bool = False
    sinks: str = "none"
    rope: bool = False
    tree: bool = False
    debug: bool = False

    template = "decode.cu.jinja"
    kind = "decode"

    def __post_init__(self):
        _check(self.q_dtype in Q_DTYPES, f"q_dtype must be one of {Q_DTYPES}, got {self.q_dtype!r}")
        _check(self.kv_dtype in KV_DTYPES,
               f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        _check(self.kv_dtype in FP8_DTYPES or self.kv_dtype == self.q_dtype,
               f"a 16-bit KV cache must have q's dtype: q_dtype={self.q_dtype}, "
               f"kv_dtype={self.kv_dtype}")
        _check(self.head_dim in HEAD_DIMS,
               f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        _check(isinstance(self.group, int) and 1 <= self.group <= MAX_GROUP,
               f"group (num_qo_heads / num_kv_heads) must be in 1..{MAX_GROUP}, got {self.group}")
        _check(isinstance(self.q_len, int) and 1 <= self.q_len <= MAX_Q_LEN,
               f"q_len must be in 1..{MAX_Q_LEN}, got {self.q_len}")
        _check(self.sinks in SINK_FORMS, f"sinks must be one of {SINK_FORMS}, got {self.sinks!r}")
        _check(not (self.tree and self.q_len == 1), "tree=True needs q_len > 1")
        for f in ("window", "rope", "tree", "debug"):
            _check(isinstance(getattr(self, f), bool), f"{f} must be a bool")

    @property
    def kv_fp8(self) -> bool:
        return self.kv_dtype in FP8_DTYPES

    @property
    def name(self) -> str:
        parts = [f"decode_q{self.q_dtype}_kv{self.kv_dtype}_d{self.head_dim}_g{self.group}"]
        if self.q_len > 1:
            parts.append(f"lq{self.q_len}")
        if self.tree:
            parts.append("tree")
        if self.window:
            parts.append("win")
        if self.sinks != "none":
            parts.append(f"sink{self.sinks.replace('_', '')}")
        if self.rope:
            parts.append("rope")
        if self.debug:
            parts.append("debug")
        return "_".join(parts)

    def template_args(self) -> dict:
        """Constants and types the template fills in (nothing else varies in the source)."""
        return {**self._dtype_args(), "head_dim": self.head_dim, "group": self.group,
                "q_len": self.q_len, "window": int(self.window),
                "sinks": SINK_FORMS.index(self.sinks), "rope": int(self.rope),
                "tree": int(self.tree)}


MLA_Q_DTYPES = ("fp16", "bf16")
MLA_KV_DTYPES = ("fp16", "bf16", "e4m3")
MLA_HEADS = (16, 32, 64, 128)
MLA_IMPLS = ("v1", "v2", "v3", "v4")


def mla_impl_for(num_heads: int, kv_dtype: str, arch: str, page_size: int = 64) -> str:
    """The latent kernel to use, by what measured fastest on the H100 (benchmarks/NOTES.md):
    v3 (wgmma, TMA, two warpgroups on two tiles per step; sm_90a) for pages of 8+ tokens, any
    head count (16 / 32 heads padded to one 64-row group: v15), 16-bit or FP8 cache (FP8 expanded
    to f16 in shared memory: 1.25-1.40x v1 / v2, v16); with smaller pages v2 (wgmma; sm_90a) for
    64+ heads and an FP8 cache with 32+ heads; else v1 (mma.sync; with an FP8 cache and 16 heads
    207.6 us against v2's 233.4 on the H100, NOTES v15)."""
    if not (arch.startswith("9.0") and arch.endswith("a")):
        return "v1"
    if page_size >= 8:
        return "v3"
    if num_heads >= 64 or (kv_dtype in FP8_DTYPES and num_heads >= 32):
        return "v2"
    return "v1"


@dataclass(frozen=True)
class MlaSpec(_SpecBase):
    """One variant of the DeepSeek-style latent-attention decode kernel (``xqa_mla``).

    Keys are the whole ``qk_dim``-wide latent row, values its first ``v_dim`` elements.
    impl: "v1" (templates/mla.cu.jinja, mma.sync, any sm_80+), "v2" (templates/mla2.cu.jinja,
    wgmma with two warpgroups, sm_90a only) or "v3" (templates/mla3.cu.jinja, wgmma + TMA, two
    warpgroups on two tiles per step, sm_90a, 16-128 heads, pages of 8+ tokens; an FP8 cache is
    expanded to f16 in shared memory) or
    "v4" (templates/mla4.cu.jinja, experimental: a cluster of two blocks per request splitting the
    latent dims, 128 heads, 16-bit caches, one chunk per request; never chosen by mla_impl_for).
    """

    q_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    num_heads: int = 128
    qk_dim: int = 576
    v_dim: int = 512
    debug: bool = False
    impl: str = "v1"

    kind = "mla"

    @property
    def template(self) -> str:
        return {"v1": "mla.cu.jinja", "v2": "mla2.cu.jinja", "v3": "mla3.cu.jinja",
                "v4": "mla4.cu.jinja"}[self.impl]

    def __post_init__(self):
        _check(self.q_dtype in MLA_Q_DTYPES,
               f"q_dtype must be one of {MLA_Q_DTYPES}, got {self.q_dtype!r}")
        _check(self.kv_dtype in MLA_KV_DTYPES,
               f"MLA kv_dtype must be one of {MLA_KV_DTYPES}, got {self.kv_dtype!r}")
        _check(self.kv_dtype in FP8_DTYPES or self.kv_dtype == self.q_dtype,
               f"a 16-bit latent cache must have q's dtype: q_dtype={self.q_dtype}, "
               f"kv_dtype={self.kv_dtype}")
        _check(self.num_heads in MLA_HEADS,
               f"MLA num_heads must be one of {MLA_HEADS}, got {self.num_heads}")
        _check((self.qk_dim, self.v_dim) == (576, 512),
               f"MLA latent kernel supports qk_dim=576, v_dim=512 (DeepSeek-V2/V3), "
               f"got qk_dim={self.qk_dim}, v_dim={self.v_dim}")
        _check(isinstance(self.debug, bool), "debug must be a bool")
        _check(self.impl in MLA_IMPLS, f"MLA impl must be one of {MLA_IMPLS}, got {self.impl!r}")
        _check(self.impl != "v4" or (self.kv_dtype not in FP8_DTYPES and self.num_heads == 128),
               f"MLA impl v4 takes a 16-bit cache and 128 heads, got kv_dtype={self.kv_dtype}, "
               f"num_heads={self.num_heads}")

    @property
    def kv_fp8(self) -> bool:
        return self.kv_dtype in FP8_DTYPES

    @property
    def name(self) -> str:
        n = f"mla_q{self.q_dtype}_kv{self.kv_dtype}_h{self.num_heads}_d{self.qk_dim}v{self.v_dim}"
        return n + ("_debug" if self.debug else "") + ("" if self.impl == "v1" else f"_{self.impl}")

    def template_args(self) -> dict:
        return {**self._dtype_args(), "num_heads": self.num_heads, "qk_dim": self.qk_dim,
                "v_dim": self.v_dim}


def _parse_name(name: str) -> "DecodeSpec | MlaSpec":
    """Inverse of ``spec.name`` (used by ``cache_tool.py info/render``)."""
    toks = name.split("_")
    try:
        if toks[0] == "decode":
            kw: dict = {"q_dtype": toks[1][1:], "kv_dtype": toks[2][2:],
                        "head_dim": int(toks[3][1:]), "group": int(toks[4][1:])}
            for t in toks[5:]:
                if t.startswith("lq"):
                    kw["q_len"] = int(t[2:])
                elif t == "tree":
                    kw["tree"] = True
                elif t == "win":
                    kw["window"] = True
                elif t.startswith("sink"):
                    kw["sinks"] = {"perhead": "per_head", "keys": "keys"}[t[4:]]
                elif t == "rope":
                    kw["rope"] = True
                elif t == "debug":
                    kw["debug"] = True
                else:
                    raise KeyError(t)
            return DecodeSpec(**kw)
        if toks[0] == "mla":
            qk, v = toks[4][1:].split("v")
            extra = set(toks[5:])
            impls = set(MLA_IMPLS) - {"v1"}  # v1 has no suffix
            if extra - {"debug"} - impls:
                raise KeyError(sorted(extra - {"debug"} - impls)[0])
            return MlaSpec(q_dtype=toks[1][1:], kv_dtype=toks[2][2:], num_heads=int(toks[3][1:]),
                           qk_dim=int(qk), v_dim=int(v), debug="debug" in extra,
                           impl=next(iter(sorted(extra & impls)), "v1"))
    except (IndexError, KeyError, ValueError) as e:
        raise SpecError(f"cannot parse spec name {name!r} ({e})") from None
    raise SpecError(f"cannot parse spec name {name!r}: it starts with neither 'decode' nor 'mla'")
