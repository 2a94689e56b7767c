"""advplug: plugin-based adversarial training for PyTorch."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("advplug")

from .context import NATURAL, CombinedWeights, Declaration, StepContext, TrainContext, Variant, Weights  # noqa: E402
from .errors import AdvplugError, CheckpointError, DataError, OptionError, PluginError  # noqa: E402
from .options import opt  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "opt", "NATURAL", "CombinedWeights", "Declaration", "StepContext", "TrainContext",
    "Variant", "Weights",
    "AdvplugError", "CheckpointError", "DataError", "OptionError", "PluginError",
]
