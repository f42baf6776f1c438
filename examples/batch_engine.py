"""The seed doc's "完整批量推理示例" (full batch inference loop): BatchInferenceEngine, runnable.

    python examples/batch_engine.py                  # run the example as written
    python examples/batch_engine.py --check          # and compare every layer with the reference
    python examples/batch_engine.py --check --random-cache

As in the doc, the engine is a sketch: each "layer" is one xqa call whose output becomes the next
layer's query, K and V are the same tensor, and the caches start as zeros, so every output is zero.
``--random-cache`` (not in the doc) fills the caches with random values so that the check means
something. For a real decode loop over a Hugging Face model see examples/hf_paged_decode.py.
"""
import argparse

import torch
import xqa_jit


class BatchInferenceEngine:
    def __init__(self, num_layers, num_qo_heads, num_kv_heads, head_dim, page_size):
        self.num_layers = num_layers
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size

        # One KV cache per layer
        self.kv_caches = [
            torch.zeros(512, page_size, num_kv_heads, head_dim,
                        dtype=torch.float16, device="cuda:0")
            for _ in range(num_layers)
        ]

    def decode_step(self, layer_idx, q, page_table, seq_lens):
        """Decode attention of one layer."""
        k_cache = self.kv_caches[layer_idx]
        v_cache = k_cache  # simplified example

        output = xqa_jit.xqa(
            q, k_cache, v_cache, page_table, seq_lens,
            head_dim=self.head_dim,
            page_size=self.page_size,
            num_kv_heads=self.num_kv_heads,
            pos_encoding_mode="ROPE_LLAMA"
        )

        return output

    def generate_step(self, queries, page_tables, seq_lens):
        """Generate one token."""
        batch_size = queries.shape[0]

        # Decode every layer
        hidden_states = queries
        for layer_idx in range(self.num_layers):
            # Linear projections (simplified: a real model needs the full Transformer layer)
            q = hidden_states  # simplified

            # XQA attention
            attn_output = self.decode_step(layer_idx, q, page_tables, seq_lens)

            # Update the hidden states (simplified)
            hidden_states = attn_output

        return hidden_states


def main(check: bool = False, random_cache: bool = False):
    """Run the example; with ``check``, return the max over layers of max |out - reference|."""
    torch.manual_seed(0)  # not in the doc: makes --check reproducible

    # Usage
    engine = BatchInferenceEngine(
        num_layers=32, num_qo_heads=32, num_kv_heads=8,
        head_dim=128, page_size=16
    )
    if random_cache:  # not in the doc
        for cache in engine.kv_caches:
            cache.normal_()

    batch_size = 16
    q = torch.randn(batch_size, 32, 128).half().to("cuda:0")
    page_table = torch.randint(0, 512, (batch_size, 32)).int().to("cuda:0")
    seq_lens = torch.randint(100, 500, (batch_size,)).int().to("cuda:0")

    output = engine.generate_step(q, page_table, seq_lens)

    print(f"output shape: {output.shape}")  # torch.Size([16, 32, 128])

    if not check:
        return None
    from xqa_jit.reference import xqa_reference

    # Replay the layer loop, comparing each layer's kernel output with the reference on the same input.
    err = 0.0
    hidden_states = q
    for layer_idx in range(engine.num_layers):
        out = engine.decode_step(layer_idx, hidden_states, page_table, seq_lens)
        cache = engine.kv_caches[layer_idx]
        ref = xqa_reference(
            hidden_states, cache, cache, page_table, seq_lens,
            head_dim=engine.head_dim, page_size=engine.page_size, num_kv_heads=engine.num_kv_heads,
            pos_encoding_mode="ROPE_LLAMA",
        )
        err = max(err, (out.float() - ref).abs().max().item())
        hidden_states = out
    final_err = (output.float() - hidden_states.float()).abs().max().item()
    print(f"max |out - reference| over {engine.num_layers} layers = {err:.3e}; "
          f"generate_step vs replay = {final_err:.3e}")
    return max(err, final_err)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the PyTorch reference")
    parser.add_argument("--random-cache", action="store_true",
                        help="fill the caches with random values (the doc leaves them zero)")
    args = parser.parse_args()
    main(check=args.check, random_cache=args.random_cache)
