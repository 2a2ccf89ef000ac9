"""The command lines: `python -m idefics_jax.{train,convert,generate,evaluate,serve}` run the
`main` of the module of the same name here."""
