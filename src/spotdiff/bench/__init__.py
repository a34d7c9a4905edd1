"""spotdiff.bench: the commands that run the stages end to end, ``spotdiff benchmark`` and ``spotdiff demo``.

* :mod:`spotdiff.bench.config` -- the benchmark's YAML config (:func:`load_config`, :func:`parse_config`);
* :mod:`spotdiff.bench.schema` -- its data types (:class:`BenchmarkConfig`, :class:`Cell`, :class:`CellOutput`);
* :mod:`spotdiff.bench.cells` -- the downstream runners (:data:`DOWNSTREAM`: padim, patchcore, cls, seg);
* :mod:`spotdiff.bench.claims` -- several processes sharing one ``--out``: config record, shards, claims;
* :mod:`spotdiff.bench.grid` -- weights preparation, the grid, :func:`run_benchmark`, :func:`collect_benchmark`;
* :mod:`spotdiff.bench.results` -- results.csv/json, tables.md and report.html of a benchmark;
* :mod:`spotdiff.bench.demo` -- ``spotdiff demo``.

The tables, plots and HTML they write come from :mod:`spotdiff.report`. Importing this package loads
nothing heavy; import the submodules you need.
"""
