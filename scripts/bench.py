"""The benchmark of SPEC §10; see edge/tools/bench/ for what it measures and how.

Usage: python scripts/bench.py [--quick] [--out DIR] [--sections a,b] [--profile] [--rss-decisions M]
"""

import sys

from edge.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
