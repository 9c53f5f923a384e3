"""The test suite, one folder per layer of the library (core, data, models, runner), end-to-end
runs (e2e) and the benchmark scripts' own checks; shared helpers live in ``tests.helpers``."""
