"""`python -m nestc ...` runs the command line (also what `torchrun -m nestc` needs)."""

from .cli import main

main()
