#!/usr/bin/env python
"""Chinese vocabulary extension + checkpoint resize; see ``megatron_sat.tools.extend_vocab``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sat.tools.extend_vocab import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
