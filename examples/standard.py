"""Standard XQA decode: the seed doc's first example ("标准 XQA"), runnable.

    python examples/standard.py           # run the example
    python examples/standard.py --check   # and compare with xqa_jit.reference.xqa_reference

32 requests, 32 query heads over 8 KV heads (GQA 4), head_dim 128, 16-token pages in a pool of 512,
random page tables and lengths up to 4096, exactly as in the doc.
"""
import argparse

import torch
import xqa_jit


def main(check: bool = False):
    """Run the example; with ``check``, return max |out - reference| (float), else None."""
    torch.manual_seed(0)  # not in the doc: makes --check reproducible

    batch_size = 32
    num_qo_heads = 32
    num_kv_heads = 8
    head_dim = 128
    page_size = 16
    max_num_pages = 512
    max_seq_len = 4096

    # Queries
    q = torch.randn(batch_size, num_qo_heads, head_dim).half().to("cuda:0")

    # Paged KV cache
    k_cache = torch.randn(
        max_num_pages, page_size, num_kv_heads, head_dim,
        dtype=torch.float16, device="cuda:0"
    )
    v_cache = k_cache.clone()

    # Page table (page indices of each request)
    max_pages_per_seq = max_seq_len // page_size + 1
    page_table = torch.randint(
        0, max_num_pages, (batch_size, max_pages_per_seq)
    ).int().to("cuda:0")

    # Sequence lengths
    seq_lens = torch.randint(100, max_seq_len, (batch_size,)).int().to("cuda:0")

    # Run XQA
    output = xqa_jit.xqa(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        pos_encoding_mode="NONE"
    )

    print(f"output shape: {output.shape}")  # torch.Size([32, 32, 128])

    if not check:
        return None
    from xqa_jit.reference import xqa_reference

    ref = xqa_reference(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
        pos_encoding_mode="NONE",
    )
    err = (output.float() - ref).abs().max().item()
    print(f"max |out - reference| = {err:.3e}")
    return err


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the PyTorch reference")
    main(check=parser.parse_args().check)
