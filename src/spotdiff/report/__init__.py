"""spotdiff.report: paper-style tables, figures, the self-contained HTML report, demo and benchmark.

* :mod:`spotdiff.report.tables` -- :class:`ResultRecord`, :func:`paper_tables`, :func:`object_backbone_table`;
* :mod:`spotdiff.report.plots` -- PR/ROC curves, gallery of best and worst cases, per-defect-type bars;
* :mod:`spotdiff.report.html` -- :func:`write_html_report` (one file, images as data URIs);
* :mod:`spotdiff.report.demo` -- ``spotdiff demo``;
* :mod:`spotdiff.report.benchmark` -- ``spotdiff benchmark`` (resumable grid of cells).

Importing this package loads nothing heavy; import the submodules you need.
"""
