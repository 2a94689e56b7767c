"""Data: where a run's images come from and how they reach the model.

Every batch is ``(x, y, index)`` with ``x`` in [0, 1] and ``index`` the sample's position in the
training set (per-sample plugin state is keyed by it).

Modules, one job each (the source *names*, ``digits``, ``npz:PATH``, ``python`` ..., are in
``advplug.source_names``, which the config reads too):

* ``bundle``: ``DataBundle`` (train / test / held-out splits, shape facts) and ``Indexed`` items;
* ``sources``: data sets by name (the embedded digits, torchvision's, ``module:`` code);
* ``files``: the user's ``npz:`` arrays and ``folder:`` images;
* ``checks``: validation of what the user hands over;
* ``splits``: splits held out of the training set (model selection, plugins' validation);
* ``batches``: batches from in-memory tensors or a DataLoader;
* ``device``: the on-device path (``--data-path device``) with its augmentation.

Re-exported here: what the rest of advplug imports.
"""

from advplug.data.batches import LoaderBatches, TensorBatches, batches
from advplug.data.bundle import DataBundle
from advplug.data.checks import as_bundle, as_images, as_labels
from advplug.data.device import device_batches
from advplug.data.sources import load_dataset, load_digits_tensors
from advplug.data.splits import hold_out
from advplug.source_names import PYTHON, SOURCES, check_data_import, is_custom, normalise_source

__all__ = [
    "PYTHON",
    "SOURCES",
    "DataBundle",
    "LoaderBatches",
    "TensorBatches",
    "as_bundle",
    "as_images",
    "as_labels",
    "batches",
    "check_data_import",
    "device_batches",
    "hold_out",
    "is_custom",
    "load_dataset",
    "load_digits_tensors",
    "normalise_source",
]
