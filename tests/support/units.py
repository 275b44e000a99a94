"""Units the tests count in, stated once and independently of the code under test."""

NS = 1_000_000_000  # nanoseconds per second
