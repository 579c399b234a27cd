"""Job: evaluate a model on a held-out split (frozen vs fine-tuned, crop vs whole photo) and print the table.

`ray job submit --working-dir . -- python jobs/evaluate.py --help`; the same as `ootd evaluate`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` in Ray's copy of the repo too
from ootd.cli import job  # noqa: E402

main = job("evaluate")
if __name__ == "__main__":
    sys.exit(main())
