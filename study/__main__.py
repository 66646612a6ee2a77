"""`python -m study ...`: the same command line as the `study` console script."""
import sys

from .cli import main

sys.exit(main())
