"""`python -m idefics_jax.ablate`: the command line in `idefics_jax.cli.ablate`."""

import sys

from idefics_jax.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
