"""Greedy batched decoding of a Hugging Face Llama over a paged KV cache, with xqa_jit.xqa as attention.

    python examples/hf_paged_decode.py                          # GPU: xqa kernel, both rotary modes
    python examples/hf_paged_decode.py --mode ROPE_LLAMA --steps 32 --prompt-lens 5,17,40,77,130
    python examples/hf_paged_decode.py --device cpu             # CPU: the PyTorch reference attention

A small random-initialised ``LlamaForCausalLM`` is built in code (no download). Each request's prompt
is prefilled with the model's own forward; its keys and values are written into a page pool; then every
decode step runs our own layer loop over the model's modules, with attention replaced by one
``xqa_jit.xqa`` call per layer over the pool. The result is compared with Hugging Face's own greedy
decoding (a manual loop of full forward passes with its KV cache), printing token agreement and the
largest logit difference.

Two ways to store keys (``--mode``):

- ``NONE``: the pool holds keys after rotary embedding, as Hugging Face's cache does; q and the new key
  are rotated with the model's ``rotary_emb`` / ``apply_rotary_pos_emb`` before attention.
- ``ROPE_LLAMA``: the pool holds keys before rotary; q and k are passed un-rotated and the kernel
  rotates them (``pos_encoding_mode="ROPE_LLAMA"``, ``rope_theta`` from the config). Only Hugging Face's
  "default" and "linear" rope types can use this mode. Values are never rotated.

The attention is a pluggable callable (``--backend``): ``xqa`` (the CUDA kernel), ``reference``
(``xqa_jit.reference.xqa_reference``, pure PyTorch, runs on the CPU) or ``torch`` (a small gather +
softmax written here, independent of xqa_jit). Every backend has the signature of ``xqa_jit.xqa``.
"""
from __future__ import annotations

import argparse
import random
from typing import Callable, Sequence

import torch

MODES = ("NONE", "ROPE_LLAMA")

# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def make_config(
    *, vocab_size: int = 1000, hidden_size: int = 256, intermediate_size: int = 512,
    num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 2, head_dim: int = 64,
    rope_theta: float = 10000.0, rope_scale: float = 1.0, initializer_range: float = 0.05,
    max_position_embeddings: int = 4096,
):
    """A small ``LlamaConfig`` (GQA by default: 8 query heads over 2 KV heads).

    ``initializer_range`` is larger than Llama's 0.02 so that the random model's attention is far from
    uniform (with 0.02 every score is ~0 and a position or paging bug would hardly show in the logits);
    much larger and the random network turns chaotic, amplifying fp16 rounding (0.1: HF's own fp16
    logits differ from its fp32 ones by 0.24).
    ``rope_scale != 1`` selects Hugging Face's "linear" rope type with that factor.
    """
    import transformers
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scale != 1.0:
        rope = {"rope_type": "linear", "rope_theta": float(rope_theta), "factor": float(rope_scale)}
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=False,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = rope
    else:  # 4.x keeps theta and scaling apart
        kwargs["rope_theta"] = float(rope_theta)
        if rope_scale != 1.0:
            kwargs["rope_scaling"] = {"rope_type": "linear", "factor": float(rope_scale)}
    return LlamaConfig(**kwargs)


def build_model(config, *, dtype=torch.float16, device="cuda", seed: int = 0,
                attn_implementation: str = "sdpa"):
    """A random-initialised ``LlamaForCausalLM`` (seeded) in eval mode on ``device``/``dtype``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:
        model.config._attn_implementation = attn_implementation
    return model.to(device=device, dtype=dtype).eval()


def rope_args(config) -> tuple[float, float]:
    """``(rope_theta, rope_scale)`` for ``pos_encoding_mode="ROPE_LLAMA"``.

    transformers 5.x keeps theta in ``config.rope_parameters["rope_theta"]``; 4.x in
    ``config.rope_theta`` with the scaling in ``config.rope_scaling``. Rope types other than "default"
    and "linear" (llama3, yarn, ...) are not what the kernel computes: those models must store rotated
    keys and use mode "NONE".
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params.update(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(params["rope_theta"]), 1.0
    if rope_type == "linear":
        return float(params["rope_theta"]), float(params["factor"])
    raise ValueError(f"rope type {rope_type!r} is not ROPE_LLAMA's (default/linear): use mode 'NONE'")


# --------------------------------------------------------------------------------------------------
# The page pool
# --------------------------------------------------------------------------------------------------


class PagePool:
    """A fixed pool of ``num_pages`` pages of ``page_size`` tokens, shared by all requests.

    Per layer, K and V caches of shape (num_pages, page_size, Hkv, D) (NHD). With ``fused=True`` each
    layer has one (num_pages, 2, page_size, Hkv, D) tensor and K, V are its two strided halves.
    Pages come from a free list (shuffled, so a request's pages are scattered through the pool) as
    sequences grow, and go back when a request is released.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype, device, fused: bool = False, shuffle_seed: int | None = 0):
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        if fused:
            pools = [torch.zeros(num_pages, 2, *shape[1:], dtype=dtype, device=device)
                     for _ in range(num_layers)]
            self.k = [p[:, 0] for p in pools]
            self.v = [p[:, 1] for p in pools]
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = torch.device(device)
        self.free = list(range(num_pages))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.free)
        self.pages: dict[int, list[int]] = {}  # request id -> its pages, in order
        self.lens: dict[int, int] = {}  # request id -> tokens stored

    def add_request(self, rid: int) -> None:
        self.pages[rid] = []
        self.lens[rid] = 0

    def release(self, rid: int) -> None:
        self.free.extend(self.pages.pop(rid))
        del self.lens[rid]

    def grow(self, rids: Sequence[int], counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for ``counts[i]`` more tokens of request ``rids[i]``.

        Returns (page ids, slots), two int64 device tensors with one entry per new token in order,
        for ``write``. Allocates pages from the free list as needed.
        """
        page_ids, slots = [], []
        for rid, n in zip(rids, counts):
            start = self.lens[rid]
            end = start + n
            pages = self.pages[rid]
            need = -(-end // self.page_size) - len(pages)
            if need > len(self.free):
                raise RuntimeError(f"page pool exhausted: request {rid} needs {need} more pages, "
                                   f"{len(self.free)} free of {self.num_pages}")
            pages.extend(self.free.pop() for _ in range(need))
            for pos in range(start, end):
                page_ids.append(pages[pos // self.page_size])
                slots.append(pos % self.page_size)
            self.lens[rid] = end
        as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        return as_t(page_ids), as_t(slots)

    def write(self, layer: int, page_ids: torch.Tensor, slots: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, Hkv, D) at the (page, slot) pairs given by ``grow``."""
        self.k[layer][page_ids, slots] = k
        self.v[layer][page_ids, slots] = v

    def table(self, rids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``page_table`` (B, M) int32 and ``seq_lens`` (B,) int32 of these requests, in order.

        M is the largest page count; entries past a request's last page are 0 (ignored by xqa).
        """
        width = max(1, max(len(self.pages[r]) for r in rids))
        rows = [self.pages[r] + [0] * (width - len(self.pages[r])) for r in rids]
        page_table = torch.tensor(rows, dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor([self.lens[r] for r in rids], dtype=torch.int32, device=self.device)
        return page_table, seq_lens


# --------------------------------------------------------------------------------------------------
# Attention backends: callables with xqa_jit.xqa's signature, returning (B, Hq, D) in q's dtype
# --------------------------------------------------------------------------------------------------


def torch_paged_attention(q, k_cache, v_cache, page_table, seq_lens, *, sm_scale=None,
                          pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, **unused):
    """Decode attention over an NHD page pool in plain PyTorch (float32), one request at a time.

    Independent of xqa_jit: it checks the engine's bookkeeping even where the package is broken.
    Supports what the engine uses: Lq = 1, GQA, ROPE_LLAMA (rotate-half; HF's default/linear).
    """
    B, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros_like(q)
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=q.device) / D))
    inv_freq = inv_freq / rope_scale

    def rotate(x, pos):  # x (..., L, H, D), pos (L,)
        ang = pos.float()[:, None] * inv_freq  # (L, D/2)
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        pages = page_table[b, : -(-L // P)].long()
        k = k_cache[pages].reshape(-1, Hkv, D)[:L].float()
        v = v_cache[pages].reshape(-1, Hkv, D)[:L].float()
        qb = q[b].float()
        if pos_encoding_mode == "ROPE_LLAMA":
            pos = torch.arange(L, device=q.device)
            k = rotate(k, pos)
            qb = rotate(qb[None], pos[-1:])[0]
        elif pos_encoding_mode != "NONE":
            raise ValueError(f"unknown pos_encoding_mode {pos_encoding_mode!r}")
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (L, Hq, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", qb, k) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", p, v).to(q.dtype)
    return out


def make_backend(name: str) -> Callable:
    """``xqa`` (the CUDA kernel), ``reference`` (xqa_jit.reference) or ``torch`` (above)."""
    if name == "xqa":
        import xqa_jit

        def xqa_attention(q, k_cache, v_cache, page_table, seq_lens, **kw):
            return xqa_jit.xqa(q, k_cache, v_cache, page_table, seq_lens, kv_layout="NHD", **kw)

        return xqa_attention
    if name == "reference":
        from xqa_jit.reference import xqa_reference

        def reference_attention(q, k_cache, v_cache, page_table, seq_lens, **kw):
            return xqa_reference(q, k_cache, v_cache, page_table, seq_lens, kv_layout="NHD",
                                 **kw).to(q.dtype)

        return reference_attention
    if name == "torch":
        return torch_paged_attention
    raise ValueError(f"unknown attention backend {name!r}: xqa, reference or torch")


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class PagedLlamaEngine:
    """Batched greedy decoding of a ``LlamaForCausalLM`` with paged KV and a pluggable attention.

    ``prefill(prompts)`` runs each prompt through the model's own forward (batch 1, no padding),
    capturing every layer's k_proj / v_proj outputs with forward hooks, and writes them into the
    pool (rotated first in mode "NONE"). ``decode_step(tokens)`` advances every request by one token
    with our own layer loop over the model's modules; attention is ``attention(...)`` over the pool.
    """

    def __init__(self, model, *, mode: str = "NONE", backend: str | Callable = "xqa",
                 page_size: int = 16, num_pages: int = 256, fused_kv: bool = False,
                 shuffle_seed: int | None = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cfg = model.config
        self.model = model
        self.mode = mode
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.sm_scale = self.head_dim ** -0.5  # = LlamaAttention.scaling
        self.attention = make_backend(backend) if isinstance(backend, str) else backend
        self.rope_kwargs = {}
        if mode == "ROPE_LLAMA":
            theta, scale = rope_args(cfg)
            self.rope_kwargs = dict(rope_theta=theta, rope_scale=scale)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.pool = PagePool(len(model.model.layers), num_pages, page_size, self.num_kv_heads,
                             self.head_dim, dtype=self.dtype, device=self.device, fused=fused_kv,
                             shuffle_seed=shuffle_seed)
        self.rids: list[int] = []

    def reset(self) -> None:
        """Release every request (their pages go back to the free list)."""
        for rid in self.rids:
            self.pool.release(rid)
        self.rids = []

    # -- helpers --------------------------------------------------------------------------------
    def _rotary(self, position_ids: torch.Tensor):
        """HF's (cos, sin) for positions (B, T): each (B, T, D) in the model's dtype, as
        LlamaModel computes them from its hidden states."""
        x = torch.empty(0, dtype=self.dtype, device=self.device)  # only its dtype and device are used
        return self.model.model.rotary_emb(x, position_ids)

    # -- prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Add one request per prompt; returns the logits after each prompt, (B, vocab) float32."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layers = self.model.model.layers
        Hkv, D = self.num_kv_heads, self.head_dim
        captured: dict = {}
        hooks = []
        for li, layer in enumerate(layers):
            for name in ("k_proj", "v_proj"):
                def hook(mod, args, output, key=(li, name)):
                    captured[key] = output
                hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
        logits = []
        try:
            for prompt in prompts:
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
                T = ids.shape[1]
                captured.clear()
                out = self.model(input_ids=ids, use_cache=False)
                logits.append(out.logits[0, -1].float())
                rid = max(self.pool.pages, default=-1) + 1
                self.rids.append(rid)
                self.pool.add_request(rid)
                page_ids, slots = self.pool.grow([rid], [T])
                if self.mode == "NONE":
                    cos, sin = self._rotary(torch.arange(T, device=self.device)[None])
                for li in range(len(layers)):
                    k = captured[(li, "k_proj")].view(1, T, Hkv, D).transpose(1, 2)  # (1, Hkv, T, D)
                    v = captured[(li, "v_proj")].view(T, Hkv, D)
                    if self.mode == "NONE":  # exactly what LlamaAttention does before its cache
                        _, k = apply_rotary_pos_emb(k, k, cos, sin)
                    self.pool.write(li, page_ids, slots, k[0].transpose(0, 1), v)
        finally:
            for h in hooks:
                h.remove()
        return torch.stack(logits)

    # -- decode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per request (B,) (in ``self.rids`` order); returns (B, vocab) float32 logits."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        B, Hq, Hkv, D = len(self.rids), self.num_heads, self.num_kv_heads, self.head_dim
        positions = torch.tensor([self.pool.lens[r] for r in self.rids], device=self.device)
        page_ids, slots = self.pool.grow(self.rids, [1] * B)  # the new token's slot
        page_table, seq_lens = self.pool.table(self.rids)  # seq_lens include the new token

        h = m.embed_tokens(tokens.to(self.device).view(B))  # (B, hidden)
        if self.mode == "NONE":
            cos, sin = self._rotary(positions[:, None])  # (B, 1, D)
        for li, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, Hq, D)
            k = attn.k_proj(x).view(B, Hkv, D)
            v = attn.v_proj(x).view(B, Hkv, D)
            if self.mode == "NONE":  # HF's layout (B, H, T=1, D); cos/sin broadcast over heads
                q4, k4 = apply_rotary_pos_emb(q.unsqueeze(2), k.unsqueeze(2), cos, sin)
                q, k = q4.squeeze(2), k4.squeeze(2)
            self.pool.write(li, page_ids, slots, k, v)
            o = self.attention(
                q.contiguous(), self.pool.k[li], self.pool.v[li], page_table, seq_lens,
                sm_scale=self.sm_scale, pos_encoding_mode=self.mode, **self.rope_kwargs,
            )
            h = h + attn.o_proj(o.reshape(B, Hq * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h)).float()

    def generate(self, prompts: Sequence[Sequence[int]], steps: int,
                 forced_tokens: torch.Tensor | None = None):
        """Greedy: prefill, then ``steps`` decode steps. Returns tokens (B, steps+1) int64 (argmax of
        each step's logits) and logits (B, steps+1, vocab) float32; column 0 comes from the prefill.

        ``forced_tokens`` (B, >= steps): feed these instead of our own argmax (teacher forcing), so
        that the logits stay comparable with another decoder's even where a near-tie flipped a token.
        """
        logits = [self.prefill(prompts)]
        tokens = [logits[0].argmax(-1)]
        for s in range(steps):
            feed = tokens[-1] if forced_tokens is None else forced_tokens[:, s].to(self.device)
            logits.append(self.decode_step(feed))
            tokens.append(logits[-1].argmax(-1))
        return torch.stack(tokens, 1), torch.stack(logits, 1)


# --------------------------------------------------------------------------------------------------
# Hugging Face's own greedy decoding, and the comparison
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_greedy(model, prompts: Sequence[Sequence[int]], steps: int):
    """Each prompt alone through HF's forward with its own KV cache: the same outputs as
    ``generate``, computed by Hugging Face's attention (sdpa or eager)."""
    device = next(model.parameters()).device
    all_tokens, all_logits = [], []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits[0, -1].float()]
        tokens = [logits[-1].argmax(-1)]
        for _ in range(steps):
            out = model(input_ids=tokens[-1].view(1, 1), past_key_values=out.past_key_values,
                        use_cache=True)
            logits.append(out.logits[0, -1].float())
            tokens.append(logits[-1].argmax(-1))
        all_tokens.append(torch.stack(tokens))
        all_logits.append(torch.stack(logits))
    return torch.stack(all_tokens), torch.stack(all_logits)


def compare(tokens, ref_tokens, ref_logits, *, tie_tol: float) -> dict:
    """Free-running token agreement. A request's first mismatch is a *near-tie* when HF's own top-2
    logit margin there is <= ``tie_tol``: rounding alone decides such an argmax (HF's fp16 and fp32
    runs of one model disagree on them as often), and the sequences differ from there on."""
    tokens, ref_tokens, ref_logits = tokens.cpu(), ref_tokens.cpu(), ref_logits.cpu()
    same = tokens == ref_tokens
    top2 = ref_logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]  # (B, steps+1)
    first_mismatch, near_tie = [], []
    for b in range(tokens.shape[0]):
        bad = (~same[b]).nonzero()
        i = int(bad[0]) if len(bad) else None
        first_mismatch.append(i)
        near_tie.append(None if i is None else bool(margins[b, i] <= tie_tol))
    return dict(identical=bool(same.all()), agreement=same.float().mean().item(),
                first_mismatch=first_mismatch, near_tie=near_tie,
                only_near_ties=all(t is None or t for t in near_tie),
                min_margin=margins.min().item())


def random_prompts(lens: Sequence[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lens]


def run(*, mode: str = "NONE", backend: str | Callable = "xqa", device: str = "cuda",
        dtype=torch.float16, prompt_lens: Sequence[int] = (5, 17, 40, 77), steps: int = 24,
        page_size: int = 16, num_pages: int | None = None, head_dim: int = 64,
        num_layers: int = 4, rope_scale: float = 1.0, fused_kv: bool = False,
        attn_implementation: str = "sdpa", seed: int = 0, model=None, tie_tol: float = 5e-2,
        verbose: bool = True) -> dict:
    """Build the model (unless given), decode with the engine and with HF's own loop, and compare.

    Two engine runs on one page pool: free-running greedy (token agreement with HF), then teacher-
    forced on HF's tokens (max |logit - HF| over every request and step, prefill included).
    """
    if model is None:
        config = make_config(head_dim=head_dim, num_layers=num_layers, rope_scale=rope_scale)
        model = build_model(config, dtype=dtype, device=device, seed=seed,
                            attn_implementation=attn_implementation)
    prompts = random_prompts(prompt_lens, model.config.vocab_size, seed=seed)
    if num_pages is None:  # enough for every request, plus a few never used
        num_pages = sum(-(-(n + steps + 1) // page_size) for n in prompt_lens) + 8
    engine = PagedLlamaEngine(model, mode=mode, backend=backend, page_size=page_size,
                              num_pages=num_pages, fused_kv=fused_kv)
    ref_tokens, ref_logits = hf_greedy(model, prompts, steps)
    tokens, _ = engine.generate(prompts, steps)
    result = compare(tokens, ref_tokens, ref_logits, tie_tol=tie_tol)
    engine.reset()  # the forced run reuses the released pages, in another order
    _, logits = engine.generate(prompts, steps, forced_tokens=ref_tokens)
    result.update(mode=mode, tokens=tokens.cpu(), ref_tokens=ref_tokens.cpu(),
                  max_logit_err=(logits.cpu() - ref_logits.cpu()).abs().max().item(),
                  logit_scale=ref_logits.abs().max().item())
    if verbose:
        name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        print(f"[{mode:10s} backend={name} {str(model.dtype).replace('torch.', '')} "
              f"B={len(prompts)} lens={list(prompt_lens)} steps={steps} P={page_size}"
              f"{' fused-kv' if fused_kv else ''}] "
              f"tokens identical: {result['identical']} (agreement {result['agreement']:.3f}); "
              f"max |logit - HF| = {result['max_logit_err']:.3e} over all steps, teacher-forced "
              f"(|logits| up to {result['logit_scale']:.2f})")
        if not result["identical"]:
            print(f"  first mismatching step per request: {result['first_mismatch']}; "
                  f"at a near-tie (HF top-2 margin <= {tie_tol:g}): {result['near_tie']}")
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--backend", choices=["xqa", "reference", "torch"], default=None,
                        help="default: xqa on cuda, reference on cpu")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--prompt-lens", default="5,17,40,77",
                        help="comma-separated prompt lengths, one request each")
    parser.add_argument("--steps", type=int, default=24, help="greedy decode steps")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rope-scale", type=float, default=1.0,
                        help="!= 1 uses HF's 'linear' rope type with this factor")
    parser.add_argument("--fused-kv", action="store_true",
                        help="K and V as the two halves of one (N, 2, P, Hkv, D) pool per layer")
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="Hugging Face attention used for the comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    on_cuda = args.device.startswith("cuda")
    backend = args.backend or ("xqa" if on_cuda else "reference")
    dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "float32"))
    modes = MODES if args.mode == "both" else (args.mode,)
    config = make_config(head_dim=args.head_dim, num_layers=args.layers, rope_scale=args.rope_scale)
    model = build_model(config, dtype=dtype, device=args.device, seed=args.seed,
                        attn_implementation=args.hf_attn)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    return [run(mode=mode, backend=backend, prompt_lens=lens, steps=args.steps,
                page_size=args.page_size, fused_kv=args.fused_kv, seed=args.seed, model=model)
            for mode in modes]


if __name__ == "__main__":
    main()
