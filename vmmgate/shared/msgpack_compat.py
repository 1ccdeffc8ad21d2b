"""msgpack-rpc-python 0.4.1 on msgpack 1.x, the one msgpack Ray also needs.

msgpack-rpc-python builds its packer and unpacker with msgpack 0.5's
``encoding=`` argument, which msgpack 1.0 removed. Cluster mode runs Ray
(which requires msgpack >= 1.0) and the RPC client in one process, and both
dists ship the same ``msgpack`` package, so the venv holds msgpack 1.x and
the library's transport module gets this stand-in for its ``msgpack``.

The bytes on the wire stay those of 0.5 with ``encoding="utf-8"``: strings as
msgpack's raw type (``use_bin_type=False``), and an unpacker that decodes raw
as UTF-8 when an encoding was asked for and returns bytes otherwise. Importing
this module is enough; under msgpack 0.5 it changes nothing.
"""

from __future__ import annotations

from typing import Any

import msgpack
from msgpackrpc.transport import tcp


class _Msgpack1:
    """What ``msgpackrpc.transport.tcp`` calls as ``msgpack``, for msgpack 1.x."""

    @staticmethod
    def Packer(encoding: str | None = None, **kwargs: Any) -> msgpack.Packer:
        """A packer that writes str as raw, as 0.5 did (``encoding`` is always UTF-8)."""
        return msgpack.Packer(use_bin_type=False, **kwargs)

    @staticmethod
    def Unpacker(encoding: str | None = None, **kwargs: Any) -> msgpack.Unpacker:
        """An unpacker that decodes raw as UTF-8 if asked, keeping 0.5's lax map keys."""
        return msgpack.Unpacker(raw=encoding is None, strict_map_key=False, **kwargs)


MSGPACK_1 = msgpack.version >= (1, 0, 0)
if MSGPACK_1:
    tcp.msgpack = _Msgpack1
