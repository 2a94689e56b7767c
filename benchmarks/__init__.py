"""Benchmarks and behaviour checks, run from the repository root (``python benchmarks/<name>.py``,
``python -m benchmarks.groundtruth``)."""
