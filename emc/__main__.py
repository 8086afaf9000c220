"""`python -m emc` is the `emc` command."""

from emc.cli.errors import main

main()
