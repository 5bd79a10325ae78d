"""Inspect or compress a saved SSM model: ``python scripts/analyze.py spectrum MODEL_DIR``.

A thin wrapper around ``compressm-analyze`` (:mod:`compressm_hf.cli.analyze`);
``python scripts/analyze.py --help`` lists the subcommands.
"""

import sys

from compressm_hf.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
