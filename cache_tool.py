"""Manage the xqa_jit kernel cache: ``python cache_tool.py --help`` (same as ``xqa-jit-cache``)."""
import sys

from xqa_jit.cli import main

if __name__ == "__main__":
    sys.exit(main())
