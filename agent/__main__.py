"""``python -m agent`` is ``modelcache``."""

import sys

from agent.cli import main

sys.exit(main())
