"""`python -m idefics_jax.convert`: the command line in `idefics_jax.cli.convert`."""

import sys

from idefics_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
