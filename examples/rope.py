"""XQA with RoPE: the seed doc's "带 RoPE 的 XQA" example, runnable.

    python examples/rope.py           # run the example
    python examples/rope.py --check   # and compare with xqa_jit.reference.xqa_reference

The cache holds keys before rotary embedding; the kernel rotates q and every key by its position
(LLaMA rotate-half layout, theta 10000). Setup (q, caches, page table, lengths) as in standard.py.
"""
import sys
from pathlib import Path

import xqa_jit
from xqa_jit.reference import xqa_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _doc import cli, report, standard_setup  # noqa: E402


def main(check: bool = False):
    """Run the example; with ``check``, return max |out - reference| (float), else None."""
    # --- setup of the standard example, which the doc's snippet reuses (examples/_doc.py) ---
    s = standard_setup()
    q, k_cache, v_cache, page_table, seq_lens = (s[k] for k in ("q", "k_cache", "v_cache", "page_table", "seq_lens"))
    head_dim, page_size, num_kv_heads = s["head_dim"], s["page_size"], s["num_kv_heads"]

    # --- the doc's snippet ---
    # LLaMA-style RoPE
    output = xqa_jit.xqa(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        pos_encoding_mode="ROPE_LLAMA",
        rope_scale=1.0,
        rope_theta=10000.0
    )

    return report(output, check, lambda: xqa_reference(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
        pos_encoding_mode="ROPE_LLAMA", rope_scale=1.0, rope_theta=10000.0,
    ))


if __name__ == "__main__":
    cli(main, __doc__)
