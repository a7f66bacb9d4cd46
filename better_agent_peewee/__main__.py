"""``python -m better_agent_peewee``: the same command line as ``better-agent-peewee``."""
import sys

from .cli import main

sys.exit(main())
