"""Evaluation: full-reference metrics, pyiqa glue, test-set scoring."""
