"""Ground-truth benchmark: does a method's reweighting find the samples its paper says it
weighs down or up? Training sets with *known* injected samples on the embedded digits, every
method trained on them, and the per-sample weights of the ``--dump-weights`` files scored against
the injection flags.

Injections (fractions of the 1437 original training samples, drawn disjointly by ``seed``):

* ``flipped``: the label replaced by a uniformly drawn *wrong* class (the image unchanged);
* ``atypical``: the image transformed, the label kept correct. ``rotate`` (default): rotated
  by an angle drawn uniformly from +-[60, 120] degrees about the centre (bilinear, zero fill);
  ``shift``: moved by 2 pixels in x and in y, each direction drawn at random (zero fill);
  ``thicken``: strokes dilated by a 3x3 max filter;
* ``duplicate``: untouched samples (neither flipped nor atypical) appended once more to the
  training set; the original *and* its copy carry the flag (they are the same sample).

Files: the injected training set (with the digits test split unchanged) is written as
``OUT/data/seed<S>.npz`` (arrays ``x_train, y_train, x_test, y_test`` read by ``--data npz:``, plus
the flags in the injected set's numbering). Each run trains on ``--data npz:<that file>``, so its
``config.json`` names the exact data and ``advplug report`` finds its images. The flags in the
run's own numbering (the trainer holds the model-selection split, and BiLAW's validation split,
out of the training set and renumbers what is left: :func:`flags_for_config` applies the same
``advplug.engine.inputs.training_data``) go to ``RUN_DIR/injection.npz`` (columns ``index``, ``flipped``,
``atypical``, ``duplicate``, ``true_label``, ``source``); the final model's true-class
probability on every (natural) training sample goes to ``RUN_DIR/confidence.npz``.

Scores. The weight of a sample in an epoch is the mean of the dump's ``weight_<variant>`` columns
(the adversarial variants; ``weight_natural`` is not used): for a global method every column holds
the same instance weight, for LRAT it is the pair's mean local weight. AUROC (sklearn's
``roc_auc_score``) is computed for "low weight means injected", i.e. of ``-weight``, with the
flagged samples as positives and the *unflagged* samples as negatives (samples of the other
injected groups are left out); 1 = every injected sample weighs less than every clean one,
0.5 = no separation, 0 = every injected sample weighs more. Methods that give no weights (AT,
TRADES, MART, AWP, FAT) weigh everything 1 and have no AUROC. Mean weights per group are relative:
the group's mean divided by the mean over all samples of that epoch (MeoW's weights are not mean 1).
The baseline is the AT model's true-class confidence on the natural training image ("low
confidence means injected", AUROC of ``-confidence``), from the AT runs of the same seeds.

Modules: ``injection`` (the injected data files and the flags in a run's numbering), ``runner``
(settings, one config per method, training), ``scoring`` (AUROC and mean weight per group),
``table`` (the summary table, CSV, JSON, files), ``plots`` (weights per group over epochs),
``planted`` (a test double with a known answer); ``python -m benchmarks.groundtruth`` runs it.
The ROC plot that ``advplug report`` draws for these runs, and the definitions it shares with the
scores (groups, per-epoch weight, AUROC direction), are in ``advplug.tools.report``.
"""

from advplug.tools.report import GROUPS, auroc_low, read_injection
from benchmarks.groundtruth.injection import TRANSFORMS, atypical_transform, flags_for_config, inject, write_data
from benchmarks.groundtruth.runner import Settings, default_methods, method_config, run
from benchmarks.groundtruth.table import write_outputs

__all__ = [
    "GROUPS",
    "TRANSFORMS",
    "Settings",
    "atypical_transform",
    "auroc_low",
    "default_methods",
    "flags_for_config",
    "inject",
    "method_config",
    "read_injection",
    "run",
    "write_data",
    "write_outputs",
]
