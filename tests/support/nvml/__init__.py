"""The NVML stand-in: ``profiles`` (real GPUs' readings, from public captures), ``library`` (a
``pynvml`` look-alike that presents them) and ``standin`` (one instance for subprocess tests)."""
