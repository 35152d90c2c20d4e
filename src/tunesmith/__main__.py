"""`python -m tunesmith` (what `torchrun -m tunesmith train CONFIG` runs on every rank): the `tunesmith` command."""

import sys

from tunesmith.cli import main

sys.exit(main())
