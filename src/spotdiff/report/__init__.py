"""spotdiff.report: paper-style tables, figures and the self-contained HTML report (rendering only).

* :mod:`spotdiff.report.tables` -- :class:`ResultRecord`, :func:`paper_tables`, :func:`object_backbone_table`;
* :mod:`spotdiff.report.plots` -- PR/ROC curves, gallery of best and worst cases, per-defect-type bars;
* :mod:`spotdiff.report.html` -- :func:`write_html_report` (one file, images as data URIs).

``spotdiff demo`` and ``spotdiff benchmark``, which run the stages and render with this package, are
:mod:`spotdiff.bench`. Importing this package loads nothing heavy; import the submodules you need.
"""
