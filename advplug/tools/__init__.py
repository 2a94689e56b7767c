"""What users run: the command line, the Python API, compare, report, the plugin template, sweeps."""
