"""The training engine: the loop, the step, runtime (device, precision, compile, DDP, EMA), resume."""
