"""Job: embed a crops table with one exported model into Milvus (`ootd_<version>`), then move the live alias.

`ray job submit --working-dir . -- python jobs/index.py --help`; the same as `ootd index`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` in Ray's copy of the repo too
from ootd.cli import job  # noqa: E402

main = job("index")
if __name__ == "__main__":
    sys.exit(main())
