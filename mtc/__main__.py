"""`python -m mtc ...` is the `mtc` command."""
import sys

from mtc.cli import main

sys.exit(main())
