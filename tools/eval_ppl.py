#!/usr/bin/env python
"""Per-domain sliding-window perplexity; see ``megatron_sat.tools.eval_ppl``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sat.tools.eval_ppl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
