"""``python -m vmmgate.cli``."""

from vmmgate.cli import main

main(prog_name="vmmgate")
