"""What tests share: sample tables, references, stand-ins for NVML and CuPy, the daemon as a
process, ports, promtool and the ``tally`` command. Tests import from here, never from another
test module or from ``conftest.py`` (which only declares fixtures)."""
