"""Imported first by the command-line tools, before anything loads gRPC: its C core would
print its own lines about a failed TLS handshake on stderr, next to kvmctl's one-line error.

`GRPC_VERBOSITY=ERROR` (or `DEBUG`) in the environment brings them back.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
