"""`python -m kvmpy.nested ...`: the harness without going through kvmpy's main CLI."""
import sys

from kvmpy.nested.cli import script_main

sys.exit(script_main())
