"""`python -m bench`: the load harness (see bench/harness.py and bench/RESULTS.md)."""
import sys

from bench.harness import main

sys.exit(main())
