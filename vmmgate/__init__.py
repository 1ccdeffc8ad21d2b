"""vmmgate: an HTTP control plane that creates QEMU virtual machines and snapshots them.

The server's layers, each importing only the ones below it:

- :mod:`vmmgate.web`: Flask and gunicorn (app factory, routes, schemas, auth,
  metrics, errors as HTTP);
- :mod:`vmmgate.core`: the domain (VMs, snapshots, admission, paths, start-up script);
- :mod:`vmmgate.infra`: configuration, the registry, the RPC client, ``/proc``;
- :mod:`vmmgate.model` and :mod:`vmmgate.errors`: the plain values and typed errors.

:mod:`vmmgate.vmm` (the bundled VMM) and :mod:`vmmgate.guest` (the demo guest)
run as their own processes; what they share with the server is in
:mod:`vmmgate.shared`. This package imports nothing, so importing any of them
never pulls in Flask.
"""
