"""The run store, the only code that knows run-file formats: the run directory and its lock
(``directory``), checkpoints (``checkpoint``), per-epoch metrics (``metrics``), evaluation results
(``results``: ``results.json`` and ``eval.json``) and per-sample dumps (``dump``)."""
