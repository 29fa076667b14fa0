"""``python -m surgeon`` runs the command line (also under torchrun)."""

from surgeon_cli.app import run

run()
