"""MLA XQA: the seed doc's "MLA XQA" example, runnable.

    python examples/mla.py           # run the example
    python examples/mla.py --check   # and compare with xqa_jit.reference.mla_reference

The doc's form of xqa_mla: a (N, P, Hkv, 2*D) cache holding [K | V] per KV head; keys are the first D
elements of a row, values the last D; out (B, Hq, D).
"""
import sys
from pathlib import Path

import torch
import xqa_jit
from xqa_jit.reference import mla_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _doc import cli, report  # noqa: E402


def main(check: bool = False):
    """Run the example; with ``check``, return max |out - reference| (float), else None."""
    torch.manual_seed(0)  # not in the doc: makes --check reproducible

    batch_size = 32
    num_qo_heads = 32
    num_kv_heads = 8
    head_dim = 128
    page_size = 16
    max_num_pages = 512

    # MLA uses a compressed KV cache layout
    mla_kv_cache = torch.randn(
        max_num_pages, page_size, num_kv_heads, head_dim * 2,
        dtype=torch.float16, device="cuda:0"
    )

    q = torch.randn(batch_size, num_qo_heads, head_dim).half().to("cuda:0")
    page_table = torch.randint(0, max_num_pages, (batch_size, 32)).int().to("cuda:0")
    seq_lens = torch.randint(100, 500, (batch_size,)).int().to("cuda:0")

    # Run MLA XQA
    output = xqa_jit.xqa_mla(
        q, mla_kv_cache, page_table, seq_lens,
        head_dim=head_dim,
        page_size=page_size,
        num_kv_heads=num_kv_heads
    )

    return report(output, check, lambda: mla_reference(
        q, mla_kv_cache, page_table, seq_lens,
        head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
    ))


if __name__ == "__main__":
    cli(main, __doc__)
