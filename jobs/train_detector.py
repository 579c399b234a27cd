"""Job: train the YOLO garment detector on YOLO-format data; writes best.pt and its metrics.

`ray job submit --working-dir . -- python jobs/train_detector.py --help`; the same as `ootd train-detector`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` in Ray's copy of the repo too
from ootd.cli import job  # noqa: E402

main = job("train-detector")
if __name__ == "__main__":
    sys.exit(main())
