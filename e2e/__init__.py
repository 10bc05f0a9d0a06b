"""End-to-end tests and the harness that runs real daemons for them (and for the demo)."""
