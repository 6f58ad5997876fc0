"""The test suite: a package, so that its shared modules are imported by name (``tests.tiny_models``)."""
