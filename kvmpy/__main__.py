"""`python -m kvmpy` == the `kvmpy` console script."""
import sys

from kvmpy.cli import main

sys.exit(main())
