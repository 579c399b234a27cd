"""Job: Ray Train DDP fine-tuning of the style encoder on a crops table; exports the best model dir.

`ray job submit --working-dir . -- python jobs/train.py --help`; the same as `ootd train`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` in Ray's copy of the repo too
from ootd.cli import job  # noqa: E402

main = job("train")
if __name__ == "__main__":
    sys.exit(main())
