"""The VMM's exit statuses (documented in docs/vmm-protocol.md).

The VMM exits with them; the server's launcher and lifecycle read them back.
"""

OK = 0  # shutdown RPC, SIGTERM/SIGINT, or the guest powered off
START_FAILED = 1  # QEMU or the RPC socket could not be set up
USAGE = 2  # bad command line (argparse)
QEMU_DIED = 3  # QEMU exited abnormally while the VM ran
BAD_INPUT = 4  # kernel/snapshot files missing, damaged or not a pair; bad tap device

#: What each exit status means, in words (GET /vms/<id>'s exit_description).
MEANINGS = {
    OK: "exited normally",
    START_FAILED: "QEMU or the RPC socket could not be set up",
    USAGE: "bad VMM command line",
    QEMU_DIED: "QEMU exited abnormally while the VM ran",
    BAD_INPUT: "bad input: kernel or snapshot file, or tap device",
}
