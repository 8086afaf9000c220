"""`python -m emc` is the `emc` command."""

from emc.cli import app

app(prog_name="emc")
