"""``lotus bench``: accuracy and latency of every variant of a run on every backend.

Modules (import the one you need; this package imports nothing):

* :mod:`~lotus_deploy.bench.run`: :func:`~lotus_deploy.bench.run.run_bench`, the benchmark itself;
* :mod:`~lotus_deploy.bench.backends`: the registered backends, each a
  :class:`lotus_deploy.runtime.Predictor` factory;
* :mod:`~lotus_deploy.bench.timing`: latency of callables, arms interleaved in rounds;
* :mod:`~lotus_deploy.bench.facts`: model facts, variants of a run, sweep efficiency, environment;
* :mod:`~lotus_deploy.bench.results`: the versioned ``results.json`` schema and its reader;
* :mod:`~lotus_deploy.bench.pareto`: Pareto fronts of (latency, accuracy) points;
* :mod:`~lotus_deploy.bench.report`: CSV, Markdown, the output folder, comparisons;
* :mod:`~lotus_deploy.bench.plots`: the Pareto and sparsity figures (matplotlib).
"""
