"""`python -m p2pkv` (and `torchrun -m p2pkv bench`)."""
import sys

from p2pkv.cli import main

sys.exit(main())
