"""`python -m mf_ext …` and the `mf-ext` script: see mf_ext/cli.py."""

import sys

from mf_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
