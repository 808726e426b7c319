"""`python -m pyrag` runs the `pyrag` command."""

import sys

from .cli import main

sys.exit(main())
