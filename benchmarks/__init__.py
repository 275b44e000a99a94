"""Benchmarks: each compares tally with a baseline in the same run and prints ratios."""
