"""The training engine: ``trainer`` (the loop, model selection, records), ``epoch`` (one pass over the data),
``step`` (one training step and its fault checks), ``runtime`` (precision, compile, DDP, EMA), ``inputs`` (data and
final config from the config), ``resume`` (checkpoint payload and --resume), ``final_eval``, ``distributed``, ``ema``,
``standalone`` (the set-up for code outside the loop)."""
