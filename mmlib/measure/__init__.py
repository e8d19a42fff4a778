"""Measuring: `mm bench` (bench, its scenarios; sweep and its helper bench_levels for --sweep and
the concurrency `mm batch` runs at) and `mm eval` (evals, eval_runner, the offline
tasks in eval_tasks/), the helper processes and the server they drive (helper), memory sampled
while they run (memory), and the result files with what is made of them (results).

Imports profiles and system; never serve or the CLI.
"""
