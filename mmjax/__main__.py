import sys

from mmjax.cli import run

sys.exit(run())
