"""Kubeflow pipelines of smlrec: the daily run and the one-off bootstrap."""
