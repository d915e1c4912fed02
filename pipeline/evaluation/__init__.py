"""Evaluation: ranking metrics, paired bootstrap, plots, the teacher's own quality."""
