"""Every Rust error variant becomes an instance of an existing ``cortex.exceptions`` class."""

import cortex
from cortex import _core, exceptions


def test_every_rust_error_maps_to_an_exported_exception_class() -> None:
    variants, samples = _core._error_samples()
    assert [index for index, _ in samples] == list(range(variants)), "one sample per variant"
    for index, exc in samples:
        assert isinstance(exc, cortex.CortexError), (index, type(exc), exc)
        name = type(exc).__name__
        assert name in exceptions.__all__ and name in cortex.__all__, name
        # ContextLength, CacheFull and Cancelled build their messages from their fields.
        assert "sample" in str(exc) or index in (8, 9, 10), (index, str(exc))


def test_internal_and_conversion_errors_have_their_own_classes() -> None:
    _, samples = _core._error_samples()
    classes = {type(exc).__name__ for _, exc in samples}
    assert {"ConversionError", "InternalError", "EngineError"} <= classes
    assert issubclass(cortex.InternalError, cortex.EngineError)
