"""The run store: run directory, checkpoints, metrics, eval store, dumps; the only code that knows run-file formats."""
