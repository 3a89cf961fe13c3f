"""How many training steps a bench run takes unless --steps says otherwise (kept apart so the CLI's help
can name them without importing torch)."""

# Each --quick run: the small adapter of the demo, seconds on a CPU.
QUICK_STEPS = 150
# Each run without --quick: a step of the bench adapter costs about 0.04 CPU-s on one thread, far less
# than the run's fixed costs (loading the tokens, scoring val and test), docs/bench.md.
BENCH_STEPS = 2000
