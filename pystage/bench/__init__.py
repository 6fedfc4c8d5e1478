"""``pystage-bench``: the benchmarks behind the README's figures (one module per job)."""
