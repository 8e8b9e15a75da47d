"""`python -m mha_jax.interop`: assemble the checkpoints that need it and print where each lies
(the Makefile's last install step)."""

from mha_jax.interop.checkpoints import main

main()
