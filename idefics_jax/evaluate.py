"""`python -m idefics_jax.evaluate`: the command line in `idefics_jax.cli.evaluate`."""

import sys

from idefics_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
