"""``python -m gateway`` runs the ``distillgate`` command."""

from gateway.cli import main

# Guarded: a spawned child process (the trainer's) imports this module again as ``__mp_main__``.
if __name__ == "__main__":
    main()
