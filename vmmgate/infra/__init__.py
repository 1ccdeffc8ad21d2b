"""Infrastructure: configuration, the registry file, the RPC client, ``/proc``.

It imports only :mod:`vmmgate.model`, :mod:`vmmgate.errors` and :mod:`vmmgate.shared`.
"""
