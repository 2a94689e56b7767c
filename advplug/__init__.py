"""advplug: plugin-based adversarial training for PyTorch."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("advplug")

from advplug.context import (  # noqa: E402
    NATURAL,
    CombinedWeights,
    Declaration,
    StepContext,
    TrainContext,
    Variant,
    Weights,
)
from advplug.errors import (  # noqa: E402
    AdvplugError,
    CheckpointError,
    DataError,
    OptionError,
    PluginError,
)
from advplug.options import opt  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "opt", "NATURAL", "CombinedWeights", "Declaration", "StepContext", "TrainContext",
    "Variant", "Weights",
    "AdvplugError", "CheckpointError", "DataError", "OptionError", "PluginError",
]
