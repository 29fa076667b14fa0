"""The ``surgeon`` command line (installed as the ``surgeon_cli`` package)."""
