"""Run the bundled VMM: ``python -m vmmgate.vmm --kernel path=K --port P``.

With ``--warm FD`` it starts ahead of its VM and waits for it (vmmgate.vmm.warm).
"""

import sys

if "--warm" in sys.argv[1:]:
    # Before the VMM's own imports: it must first tie its life to its parent's.
    from vmmgate.vmm.warm import main
else:
    from vmmgate.vmm.cli import main

sys.exit(main())
