"""Fixtures shared by every test folder, and the test process's compilation cache."""

import jax
import pytest

from experiments import jax_cache

# The runner's persistent compilation cache (its default directory), on from before this
# process compiles anything: JAX reads the setting once, at its first compilation. Runs made in
# this process then load their programs as a fresh process's would, and a rerun of the suite
# loads what the last one compiled.
jax_cache.enable()


@pytest.fixture
def x64():
    """Float64 for the test's duration, for comparisons against explicit math."""
    with jax.enable_x64(True):
        yield
