"""``python -m experiments.sweep``; see the package's docstring."""

import sys

from experiments.sweep.cli import main

sys.exit(main(cpu_only=True))
