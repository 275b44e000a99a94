"""A stand-in for ``telemetry.store.compactor`` on a read-only disk: it compacts nothing, says
so as the real one does, and exits 1. Tests point ``writer.COMPACTOR`` here."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print("ERROR\tcannot compact: [Errno 30] read-only", file=sys.stderr)
    sys.exit(1)
