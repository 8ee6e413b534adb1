"""``python -m cvt`` (and ``torchrun -m cvt train ...``) runs the CLI."""

import sys

from cvt.cli.main import main

sys.exit(main())
