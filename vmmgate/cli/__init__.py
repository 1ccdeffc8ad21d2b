"""``vmmgate``: a command-line client for a running vmmgate server.

Every command is one call of :mod:`vmmgate.client` (the routes of
docs/http-api.md), so it works against any vmmgate server it can reach.
Paths given to it are made absolute against the current directory before they
are sent, so ``vmmgate boot var/guest/vmlinuz`` means the same file whichever
directory the server runs in. The original's verbs are in
:mod:`vmmgate.cli.commands`, vmmgate's additions in :mod:`vmmgate.cli.sandbox`.
"""

from vmmgate.cli import sandbox  # noqa: F401 - registers its commands on main
from vmmgate.cli.commands import main

__all__ = ["main"]
