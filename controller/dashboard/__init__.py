"""`kvmctl dashboard`: a live, read-only web view of the cluster (see server.py)."""
