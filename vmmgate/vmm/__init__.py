"""vmmgate's bundled VMM: one process per VM, driving one QEMU child.

It is started by the server's launcher (``python -m vmmgate.vmm``) with the
original VMM's command line, serves MessagePack-RPC on ``127.0.0.1:PORT`` and
snapshots/restores its guest to a CPU file plus a memory file
(``docs/vmm-protocol.md``).
"""
