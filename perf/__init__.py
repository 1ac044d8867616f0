"""perf: Astra measured beside what a user would pick instead, in one run, on one machine.

Each ``bench_<area>.py`` module is a script (``python -m perf.bench_ipc --quick``) that runs
Astra and its peers (multiprocessing, faster-fifo, Ray, Dask, ...) on the same workloads in the
same process tree, prints a table of figures with the ratio Astra/peer for each, and one JSON
line per figure for machines to collect. ``_harness`` holds what they share: figures, the
table and JSON printing, medians and percentiles, and fork-child bookkeeping.

Principles (DESIGN.md principle 8):

1. *Side by side, one run.* Peers are re-measured beside Astra every time; figures from other
   runs or other machines are never mixed into a ratio.
2. *Honest configurations.* Every system gets the same message count, payload and buffer
   capacity; a tuned Astra configuration is printed with its figure.
3. *Timing never lives in the test suite.* Benchmarks run here, alone, on an idle machine.
4. *Clean up.* Every child is joined and every shared-memory object removed, also on error or
   Ctrl-C: a benchmark leaves nothing in ``/dev/shm``.
"""
