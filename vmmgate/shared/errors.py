"""Errors whose ``kind`` travels over RPC as the message prefix (``"invalid: ..."``).

The VMM raises them and its RPC server sends ``"<kind>: <text>"``; the server's
RPC client turns the prefix back into a typed error (:mod:`vmmgate.infra.rpc`).
They live here, not in the VMM, because the shared snapshot file format
(:mod:`vmmgate.shared.snapfile`) raises :class:`SnapshotFileError` in both
processes. The VMM's other errors build on these (:mod:`vmmgate.vmm.errors`).
"""

from __future__ import annotations


class VmmError(Exception):
    """Base of every error the VMM reports."""

    kind = "internal"

    def rpc_message(self) -> str:
        """Return the message sent to an RPC caller: ``"<kind>: <text>"``."""
        return f"{self.kind}: {self}"


class InvalidRequest(VmmError, ValueError):
    """The caller asked for something malformed."""

    kind = "invalid"


class SnapshotFileError(InvalidRequest):
    """A snapshot file is missing, damaged or does not belong to its pair."""
