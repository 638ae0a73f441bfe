"""Datasets: the leave-one-out model of a dataset, one loader per file format, and the built-in datasets."""
