"""Train a byte-level SSM LM with CompreSSM: ``python scripts/train.py --output_dir outputs/shakespeare-mamba``.

A thin wrapper around ``compressm-train`` (:mod:`compressm_hf.cli.train`), so that
``accelerate launch scripts/train.py ...`` works. ``python scripts/train.py --help`` lists every flag.
"""

import sys

from compressm_hf.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
