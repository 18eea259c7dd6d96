"""``python -m gateway`` runs the ``distillgate`` command."""

from gateway.cli import main

main()
