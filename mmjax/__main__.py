"""`python -m mmjax ...`: the `mmjax` command."""

import sys

from mmjax.cli import run

sys.exit(run())
