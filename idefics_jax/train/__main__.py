"""`python -m idefics_jax.train`: the command line in `idefics_jax.cli.train`."""

from absl import app

from idefics_jax.cli import train as command

__doc__ = command.__doc__  # absl's --help prints the __main__ module's docstring: the command's usage

if __name__ == "__main__":
    app.run(command.main, flags_parser=command.parse_flags)
