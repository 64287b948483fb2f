"""``python -m fededge.cli``: the ``fededge`` command where its script is not on PATH."""

from fededge.cli.app import main

main()
