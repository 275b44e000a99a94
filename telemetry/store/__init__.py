"""Samples at rest: where they lie (``layout``), the daemon's writer, the one dataset reader.

Layout (SPEC §2): ``<root>/<table>/date=YYYY-MM-DD/node=<node>/<stem>.parquet``.
"""
