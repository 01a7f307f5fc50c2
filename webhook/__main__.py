"""``python -m webhook ...``: the same as ``modelcache webhook ...``."""

import sys

from .main import main

sys.exit(main(sys.argv[1:]))
