#!/usr/bin/env python
"""Fetch the demo corpora and tokenizer; see ``megatron_sat.tools.fetch_demo_data``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sat.tools.fetch_demo_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
