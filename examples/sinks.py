"""XQA with attention sinks: the seed doc's "带注意力汇聚的 XQA" example, runnable.

    python examples/sinks.py           # run the example
    python examples/sinks.py --check   # and compare with xqa_jit.reference.xqa_reference

The doc's form of sinks: (S, Hkv, D) sink key vectors in the q dtype; each adds
exp(sm_scale * q.k_sink) to the softmax denominator and no value (see API.md). Setup: the standard example's, from examples/_doc.py.
"""
import sys
from pathlib import Path

import torch
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
    # Attention sink tokens
    num_sink_tokens = 4
    sinks = torch.randn(
        num_sink_tokens, num_kv_heads, head_dim
    ).half().to("cuda:0")

    output = xqa_jit.xqa(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        sinks=sinks
    )

    return report(output, check, lambda: xqa_reference(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
        sinks=sinks,
    ))


if __name__ == "__main__":
    cli(main, __doc__)
