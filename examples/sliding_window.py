"""XQA with a sliding window: the seed doc's "带滑动窗口的 XQA" example, runnable.

    python examples/sliding_window.py           # run the example
    python examples/sliding_window.py --check   # and compare with xqa_jit.reference.xqa_reference

Each query attends only its last 2048 keys (itself included). Setup as in standard.py, whose lengths
run up to 4096, so about half the requests are cut by the window.
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
    sliding_window_size = 2048  # sliding window size

    output = xqa_jit.xqa(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        sliding_window_size=sliding_window_size
    )

    return report(output, check, lambda: xqa_reference(
        q, k_cache, v_cache, page_table, seq_lens,
        head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
        sliding_window_size=sliding_window_size,
    ))


if __name__ == "__main__":
    cli(main, __doc__)
