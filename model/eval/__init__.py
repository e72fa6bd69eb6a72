"""Evaluation: metrics, pyiqa glue, scoring of result folders, HTML reports, reproduce configs."""
