"""
The benchmark suite: ``python -m benchmarks`` (or ``nox -s bench``).

Each module measures one thing against its floor, side by side in one run,
with the emulator in a process of its own so that server work never shares
the client's event loop:

- :mod:`benchmarks.makespan`: a batch of 200 jobs on a queue cap of 5
  against the cap-bound limit, polling and with webhooks, beside raw
  aiohttp loops, the command line and modelslab-py; and how long a freed
  slot sits idle.
- :mod:`benchmarks.throughput`: jobs/s and client CPU per job against raw
  aiohttp and the official ``modelslab-py`` SDK; submit plus reading the
  output; the default cap against none.
- :mod:`benchmarks.polling`: fetches per job and how late a finished job is
  noticed, against fixed-interval polling.
- :mod:`benchmarks.webhooks`: webhook-to-result latency and callbacks/s.
- :mod:`benchmarks.scale`: memory and event-loop lag with 10,000 jobs
  pending.
- :mod:`benchmarks.outputs`: decoding and saving images against
  ``base64.b64decode`` plus a plain file write.
- :mod:`benchmarks.journal`: what each store adds to a job, and its stalls.
- :mod:`benchmarks.shutdown`: closing and cancelling under 50,000 waiting
  submits; batch CPU per job by concurrency.
- :mod:`benchmarks.lag`: loop lag while big inline outputs come back.
- :mod:`benchmarks.offloop`: when decoding in a worker thread pays.
- :mod:`benchmarks.redis_store`: the Redis store's hand-offs and costs
  across processes.
- :mod:`benchmarks.hotpaths`: where the CPU goes, and what uvloop and
  orjson would change.

Each module provides ``FULL`` and ``QUICK`` settings, ``run(settings)``,
``targets(data)`` (its rows of the page's targets table) and
``render(data)`` (its section): :class:`benchmarks.report.Benchmark`. A new
benchmark is one line in ``BENCHMARKS`` in :mod:`benchmarks.__main__`.

Results go to ``benchmarks/results/latest.json`` and ``docs/performance.md``.
No test asserts a timing: ``tests/test_benchmarks.py`` runs every benchmark
at tiny sizes and checks only the shape of what it reports.
"""
