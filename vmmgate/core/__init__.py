"""The domain core: VMs and their states, snapshots, admission and limits, paths, start-up script.

It imports :mod:`vmmgate.infra`, :mod:`vmmgate.model`, :mod:`vmmgate.errors` and
:mod:`vmmgate.shared`, never the web layer (nor Flask).
"""
