"""What the seed doc's examples share: the standard example's setup (its first snippet, which the
RoPE / sliding-window / sinks snippets reuse), the --check comparison and the command line.
Not an example itself; rope.py, sliding_window.py, sinks.py and mla.py import it from their own
folder. standard.py keeps the doc's first example verbatim (this setup inline), as the proof that
the doc's code runs unchanged but for the import."""
import argparse

import torch


def standard_setup():
    """The doc's standard-example setup, verbatim but for the seed. Returns a dict of its names."""
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
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens,
                head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads)


def report(output, check: bool, reference):
    """Print the output's shape; with ``check``, compare with ``reference()`` (a float32 tensor)
    and return max |out - reference|, else None."""
    print(f"output shape: {output.shape}")  # torch.Size([32, 32, 128])
    if not check:
        return None
    err = (output.float() - reference()).abs().max().item()
    print(f"max |out - reference| = {err:.3e}")
    return err


def cli(main, doc: str):
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the PyTorch reference")
    main(check=parser.parse_args().check)
