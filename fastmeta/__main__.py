"""python -m fastmeta train ALGORITHM ... | eval ...: the training CLI (fastmeta.cli)."""

import sys

from fastmeta.cli.main import main

sys.exit(main())
