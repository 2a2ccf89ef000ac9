"""`python -m idefics_jax.generate`: the command line in `idefics_jax.cli.generate`."""

import sys

from idefics_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
