#!/usr/bin/env python
"""HF Llama ⇄ megatron-sat checkpoints; see ``megatron_sat.tools.convert_checkpoint``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sat.tools.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
