"""`python -m idefics_jax.serve`: the command line in `idefics_jax.cli.serve`."""

import sys

from idefics_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
