#!/usr/bin/env python
"""Corpora → Megatron .bin/.idx; see ``megatron_sat.tools.preprocess_data``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sat.tools.preprocess_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
