"""Job: Ray Data ingest of a style folder or manifest into the crops and errors tables (decode, dedup, detect, crop).

`ray job submit --working-dir . -- python jobs/ingest.py --help`; the same as `ootd ingest`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` in Ray's copy of the repo too
from ootd.cli import job  # noqa: E402

main = job("ingest")
if __name__ == "__main__":
    sys.exit(main())
