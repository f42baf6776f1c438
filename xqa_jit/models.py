"""A Hugging Face ``config.json`` -> the kernel specs that model needs (``cache_tool.py warmup``).

Only what changes the generated code is read: head_dim, the GQA ratio, the q dtype, whether some
layers use a sliding window, attention sinks (gpt-oss), DeepSeek's latent attention, and whether the
model's rotary embedding is one the kernel may apply itself (ROPE_LLAMA: Hugging Face's "default"
and "linear" rope types only; yarn, llama3, longrope, ... store rotated keys, so nothing is inferred
for them). Window sizes, rope theta and scales are run-time arguments and are not needed here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .spec import MAX_Q_LEN, DecodeSpec, MlaSpec, SpecError, mla_impl_for

log = logging.getLogger("xqa_jit")

#: rope types whose rotation is ROPE_LLAMA's (rotate-half, position / rope_scale)
ROPE_LLAMA_TYPES = ("default", "linear")
#: model types that have no rotate-half rotary embedding (absolute positions, ALiBi, interleaved)
_NO_ROTATE_HALF = frozenset({"gpt2", "gptj", "opt", "bloom", "mpt", "codegen", "chatglm", "glm"})
#: model types whose sliding-window layers alternate with full ones when no layer_types is given
_ALTERNATING = frozenset({"gemma2", "gemma3", "gemma3_text", "cohere2"})

KV_CHOICES = ("auto", "fp8", "e4m3", "e5m2", "fp16", "bf16")
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16"}


def load_config(path) -> dict:
    """A config.json file, or a model directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    with open(p) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise SpecError(f"{p}: a Hugging Face config.json must hold a JSON object")
    return cfg


def _text_config(config: dict) -> dict:
    """Multimodal wrappers (Gemma 3, Llava, ...) keep the language model under text_config."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and "num_attention_heads" not in config:
        merged = {k: v for k, v in config.items() if k != "text_config"}
        merged.update(inner)
        return merged
    return config


def q_dtype_of(config: dict) -> str:
    """bf16 or fp16 from torch_dtype / dtype; anything else (float32, absent) -> bf16."""
    for k in ("dtype", "torch_dtype"):
        v = config.get(k)
        if isinstance(v, str):
            return _DTYPES.get(v.replace("torch.", "").lower(), "bf16")
    return "bf16"


def rope_type_of(config: dict) -> list:
    """The model's rope types (one per rope parameter set; ["default"] when none is given)."""
    rs = config.get("rope_scaling")
    if rs is None:
        rs = config.get("rope_parameters")
    if rs is None:
        return ["default"]
    if not isinstance(rs, dict):
        return [repr(rs)]
    if "rope_type" in rs or "type" in rs:
        return [str(rs.get("rope_type", rs.get("type")))]
    subs = [v for v in rs.values() if isinstance(v, dict)]  # per layer type (transformers v5)
    if subs:
        return [str(v.get("rope_type", v.get("type", "default"))) for v in subs]
    return ["default"]


def rope_llama_ok(config: dict) -> bool:
    """True when ROPE_LLAMA reproduces the model's rotary embedding: rope type default or linear,
    rotating the whole head in the rotate-half layout."""
    config = _text_config(config)
    if config.get("model_type") in _NO_ROTATE_HALF or config.get("alibi"):
        return False
    prf = config.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        return False
    rot = config.get("rotary_dim")
    if rot is not None and rot != head_dim_of(config):
        return False
    return all(t in ROPE_LLAMA_TYPES for t in rope_type_of(config))


def head_dim_of(config: dict) -> int:
    hd = config.get("head_dim")
    if hd:
        return int(hd)
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def fp8_kv_declared(config: dict) -> bool:
    """The checkpoint says its KV cache is FP8 (compressed-tensors kv_cache_scheme, ModelOpt
    kv_cache_quant_algo). Weight quantization (DeepSeek's fp8, gpt-oss's mxfp4) does not count."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return False
    scheme = q.get("kv_cache_scheme")
    if isinstance(scheme, dict) and scheme.get("num_bits") == 8 and scheme.get("type") == "float":
        return True
    return str(q.get("kv_cache_quant_algo", "")).upper() == "FP8"


def window_kinds(config: dict) -> list:
    """[False], [True] or [False, True]: whether full and/or sliding-window layers exist."""
    config = _text_config(config)
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        known = {"full_attention": False, "sliding_attention": True}
        unknown = sorted({str(t) for t in types} - set(known))
        if unknown:
            log.warning("xqa_jit: layer types %s are not supported by xqa_jit's kernels; no "
                        "kernel is built for those layers", unknown)
        return sorted({known[t] for t in types if t in known})
    sw = config.get("sliding_window")
    if not sw or config.get("use_sliding_window") is False:
        return [False]
    mt = config.get("model_type", "")
    if mt in _ALTERNATING or "sliding_window_pattern" in config:
        return [False, True]
    mwl = config.get("max_window_layers")
    if config.get("use_sliding_window") and mwl is not None:  # Qwen2: layers >= mwl slide
        n = int(config.get("num_hidden_layers", 0))
        if mwl >= n:
            return [False]
        return [True] if mwl <= 0 else [False, True]
    return [True]  # Mistral v0.1 and the like: every layer slides


def _kv_list(q_dtype: str, kv_dtypes, config: dict | None) -> list:
    out = []
    for k in kv_dtypes:
        k = str(k).lower()
        if k not in KV_CHOICES:
            raise SpecError(f"kv dtype must be one of {KV_CHOICES}, got {k!r}")
        if k == "auto":
            add = [q_dtype] + (["e4m3"] if config is not None and fp8_kv_declared(config) else [])
        elif k == "fp8":
            add = ["e4m3"]
        else:
            add = [k]
        out += [a for a in add if a not in out]
    return out


def _check_spec_len(spec_len) -> None:
    if spec_len is not None and not (isinstance(spec_len, int) and 1 <= spec_len <= MAX_Q_LEN):
        raise SpecError(f"spec_len (query tokens per request) must be in 1..{MAX_Q_LEN}, got "
                        f"{spec_len!r}")


def _heads_per_gpu(h: int, hkv: int, tp: int) -> tuple:
    if h % tp:
        raise SpecError(f"num_attention_heads={h} is not divisible by tensor parallelism {tp}")
    if hkv % tp and tp % hkv:
        raise SpecError(f"num_key_value_heads={hkv} and tensor parallelism {tp}: neither divides "
                        f"the other")
    return h // tp, max(1, hkv // tp)  # KV heads are replicated when tp > hkv


def specs_for_model(config: dict, kv_dtypes=("auto",), spec_len: int | None = None,
                    tp: int = 1, q_dtypes=("auto",), arch: str = "9.0a") -> list:
    """Every kernel spec a model's decode attention needs, without duplicates.

    kv_dtypes: KV cache dtypes to cover; "auto" is the q dtype (plus e4m3 when the checkpoint
    declares an FP8 KV cache), "fp8" means "e4m3". spec_len: also build q_len=spec_len (causal
    speculative decoding) variants. tp: tensor parallelism (heads per GPU). q_dtypes: "auto" (the
    checkpoint's dtype), "fp16", "bf16". arch: picks the MLA kernel the launch path will use there.
    Plain (rope=False) kernels are always included; rope=True ones only when the model's rope type
    is "default" or "linear".
    """
    _check_spec_len(spec_len)
    cfg = _text_config(config)
    qs = []
    for x in q_dtypes:
        x = q_dtype_of(cfg) if x == "auto" else x
        if x not in ("fp16", "bf16"):
            raise SpecError(f"q dtype must be auto, fp16 or bf16, got {x!r}")
        if x not in qs:
            qs.append(x)
    specs = []
    for q in qs:
        for s in _specs_for(cfg, q, kv_dtypes, spec_len, tp, arch):
            if s not in specs:
                specs.append(s)
    return specs


def _specs_for(cfg: dict, q: str, kv_dtypes, spec_len, tp, arch: str) -> list:
    h = int(cfg["num_attention_heads"])
    if cfg.get("kv_lora_rank") is not None:  # DeepSeek-V2/V3 (and Kimi-K2) latent attention
        rank, rope_dim = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim", 0))
        if (rank, rope_dim) != (512, 64):
            raise SpecError(f"latent attention with kv_lora_rank={rank}, qk_rope_head_dim="
                            f"{rope_dim}: xqa_jit's MLA kernel needs 512 + 64")
        heads, _ = _heads_per_gpu(h, h, tp)
        specs = []
        for kv in _kv_list(q, kv_dtypes, cfg):
            if kv == "e5m2":
                log.warning("xqa_jit: MLA has no e5m2 kernel; skipped")
                continue
            # the kernel for pages of 8+ tokens, and (when it differs) the one for smaller pages
            for impl in dict.fromkeys((mla_impl_for(heads, kv, arch, 64),
                                       mla_impl_for(heads, kv, arch, 1))):
                specs.append(MlaSpec(q_dtype=q, kv_dtype=kv, num_heads=heads, impl=impl))
        return specs
    hkv = int(cfg.get("num_key_value_heads") or h)
    hq_gpu, hkv_gpu = _heads_per_gpu(h, hkv, tp)
    d = head_dim_of(cfg)
    if cfg.get("attn_logit_softcapping"):
        log.warning("xqa_jit: %s uses attention logit soft-capping (%s), which xqa_jit's kernels "
                    "do not apply", cfg.get("model_type", "this model"),
                    cfg["attn_logit_softcapping"])
    sinks = "per_head" if cfg.get("model_type") == "gpt_oss" else "none"
    ropes = [False, True] if rope_llama_ok(cfg) else [False]
    q_lens = [1] + ([spec_len] if spec_len and spec_len > 1 else [])
    specs = []
    for kv in _kv_list(q, kv_dtypes, cfg):
        for lq in q_lens:
            for win in window_kinds(cfg):
                for rope in ropes:
                    s = DecodeSpec(q_dtype=q, kv_dtype=kv, head_dim=d, group=hq_gpu // hkv_gpu,
                                   q_len=lq, window=win, sinks=sinks, rope=rope)
                    if s not in specs:
                        specs.append(s)
    return specs


def expand_specs(specs, kv_dtypes=(), spec_len: int | None = None) -> list:
    """Add FP8-KV and q_len=spec_len variants to a list of specs (for warmup --config)."""
    import dataclasses

    _check_spec_len(spec_len)
    out = list(dict.fromkeys(specs))
    extra = [k for k in _kv_list("bf16", kv_dtypes, None) if k in ("e4m3", "e5m2")]
    for s in list(out):
        for kv in extra:
            if isinstance(s, MlaSpec) and kv == "e5m2":
                continue
            v = dataclasses.replace(s, kv_dtype=kv)
            if v not in out:
                out.append(v)
    if spec_len and spec_len > 1:
        for s in list(out):
            if isinstance(s, DecodeSpec) and s.q_len == 1:
                v = dataclasses.replace(s, q_len=spec_len)
                if v not in out:
                    out.append(v)
    return out
