"""`python -m edge`: the same as the `edge` command."""

import sys

from ._cli import main

sys.exit(main())
