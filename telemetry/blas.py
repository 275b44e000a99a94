"""One BLAS thread in tally's own processes.

NumPy's wheels bundle OpenBLAS, which starts a thread for every further core when NumPy is
imported (63 on a 64-core node, its cap) and lets each spin about a tenth of a second before it
sleeps. tally multiplies no matrices: its kernels are sums, scans and searches, and bills use
more cores through processes (a pool, Dask). Every tally process would pay that spin for
nothing: the node daemon at start, its hourly compactor child, each bill worker. Measured on
two cores, importing NumPy took 0.10 s of CPU with one BLAS thread and 0.21-0.23 s with the
default. The command line asks for one thread before it imports anything that imports NumPy,
and the daemon's store for its compactor child; a value the operator set is kept. Importing
tally as a library changes no environment.
"""

from __future__ import annotations

from collections.abc import MutableMapping

# OpenBLAS (NumPy's wheels), MKL, and OpenMP builds of either; Dask's nanny sets the same three.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def one_thread(environ: MutableMapping[str, str]) -> None:
    """Ask for one BLAS thread in ``environ`` (a child's environment, or this process's before
    NumPy is imported), leaving each variable already set as it is."""
    for name in BLAS_THREAD_VARIABLES:
        environ.setdefault(name, "1")
