"""What the server and the bundled VMM both need, importing neither.

The snapshot file format and its atomic commit and recovery, the console log's
segment names, the VMM's exit statuses, the errors whose kind travels over RPC,
and where the state directory is. Nothing here imports Flask, the server's
layers or the VMM's internals, so both sides (and the guest builder) can import it.
"""
