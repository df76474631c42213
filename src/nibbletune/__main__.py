"""`python -m nibbletune ...` (and `torchrun -m nibbletune train ...`): the `nibbletune` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
