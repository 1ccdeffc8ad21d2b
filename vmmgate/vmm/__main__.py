"""Run the bundled VMM: ``python -m vmmgate.vmm --kernel path=K --port P``."""

import sys

from vmmgate.vmm.cli import main

sys.exit(main())
