"""One exception type per domain. Messages say what was wrong, what was expected, what to do."""


class EdgeDistillError(Exception):
    """Base class: the CLI prints these without a traceback."""


class RecipeError(EdgeDistillError):
    """The recipe is invalid (unknown key, wrong type, missing file...)."""


class ModelError(EdgeDistillError):
    """A model or tokenizer could not be resolved or loaded."""


class DataError(EdgeDistillError):
    """Training / evaluation text is missing, empty or too short."""


class DistillError(EdgeDistillError):
    """Student construction or knowledge distillation failed."""


class CompressError(EdgeDistillError):
    """A compression method failed or was misconfigured."""


class ExportError(EdgeDistillError):
    """GGUF / ONNX export failed or a runtime refused the file."""


class EvalError(EdgeDistillError):
    """Evaluation failed or a quality gate was not met."""


class ServeError(EdgeDistillError):
    """The server could not start (bad artifact folder, missing files...)."""


class DeviceError(EdgeDistillError):
    """An unknown device, an invalid profile, or no exported file fits the device."""


class RoutingError(EdgeDistillError):
    """A routing policy (router.json) is invalid, or its calibration could not be done."""
