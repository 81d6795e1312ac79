"""The one exception family of fxq: every bad input raises a subclass of `FxqError` that says what to fix."""


class FxqError(Exception):
    """Base of every error fxq raises on purpose."""


class ConfigError(FxqError, ValueError):
    """A `QuantConfig` field is out of range or unknown."""


class TraceError(FxqError):
    """The model could not be traced into a torch.fx graph."""


class SpecializationError(FxqError):
    """A traced model was called with inputs that break a shape it was specialized on."""


class PassError(FxqError):
    """A graph pass failed or left a broken graph; the message names the pass."""


class UnsupportedOpError(FxqError):
    """An op the config requires quantized (QuantConfig.require) cannot be; the message names node and module."""


class InputError(FxqError, ValueError):
    """Example inputs or calibration data do not fit the model."""


class ReadOnlyError(FxqError, AttributeError):
    """An attribute a quantized model mirrors from its original model cannot be set."""


class ModelFileError(FxqError):
    """A file is not an fxq model, or is damaged."""


class SaveError(FxqError):
    """A model cannot be written to an fxq file (fxq.save); the message names the part and what to do."""


class FxqWarning(UserWarning):
    """Something fxq could do, but probably not what the user meant."""
