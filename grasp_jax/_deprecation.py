"""The one warning category for what grasp_jax renames or moves between releases.

A subclass of :class:`DeprecationWarning`, so that a user (or a test suite)
can silence or escalate exactly this library's deprecations without touching
those of JAX or TensorFlow::

    warnings.simplefilter("error", grasp_jax.GraspJaxDeprecationWarning)

Like every DeprecationWarning it is shown by default only in ``__main__`` and
under test runners; pass ``-W default`` to see it everywhere.
"""

from __future__ import annotations

__all__ = ["GraspJaxDeprecationWarning"]


class GraspJaxDeprecationWarning(DeprecationWarning):
    """A grasp_jax name or keyword that still works for one release; the message names
    its replacement."""
