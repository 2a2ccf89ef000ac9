"""`python -m idefics_jax.train`: the command line in `idefics_jax.cli.train`."""

from absl import app

from idefics_jax.cli.train import main

if __name__ == "__main__":
    app.run(main)
