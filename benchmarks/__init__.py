"""Speed and memory benchmarks: scripts that print a table, run as `python -m rankpipe.benchmarks.NAME`.

Their results, with the device each was measured on, are in BENCHMARKS.md. They are never timed
assertions in tests; tests run each in its smallest configuration to check what it measures.
"""
