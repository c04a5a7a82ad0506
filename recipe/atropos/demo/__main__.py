"""`python -m recipe.atropos.demo`: see cli.py."""

import sys

from recipe.atropos.demo.cli import main

sys.exit(main())
