"""`python -m sinkquant.cli`: the same as the `sinkquant` command."""

import sys

from sinkquant.cli import main

sys.exit(main())
