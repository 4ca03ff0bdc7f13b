import sys

from mmjax.cli import main

sys.exit(main())
