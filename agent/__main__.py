"""``python -m agent`` is ``modelcache``."""

import sys

from agent.cli.main import main

sys.exit(main())
