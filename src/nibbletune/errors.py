"""Project exception types: every error a user can cause is one of these, with a one-line message."""


class NibbletuneError(Exception):
    """Base class for errors caused by user input (files, config, arguments)."""


class QuantizationError(NibbletuneError, ValueError):
    """A tensor or quantization parameter that the 4-bit format cannot represent."""


class FormatError(NibbletuneError, ValueError):
    """A checkpoint or state dict that does not follow the expected layout."""


class BnbFormatUnsupportedError(QuantizationError):
    """A quantization setting (the int4 code book) that the bitsandbytes checkpoint layout cannot hold."""
