"""One module per benchmark section, named as ``benchmarks/run.py --only NAME``; each defines
``bench_NAME(quick: bool) -> str``, which measures and returns that section's Markdown. The shared helpers
are in ``benchmarks/harness.py``."""
