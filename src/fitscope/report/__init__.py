"""Reports: the study comparison (``study``) and the hyperparameter search (``search``)."""

from fitscope.report.study import verdict, write_study_report

__all__ = ["verdict", "write_study_report"]
