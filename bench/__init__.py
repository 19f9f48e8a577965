"""Benchmarks: each measures loramill against its peers in the same run."""
