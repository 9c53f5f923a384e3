"""TensorFlow for tf.data, imported without Keras (on importing this module).

TensorFlow's ``__init__`` ends by importing ``keras.src.optimizers`` (to register
Keras optimizers for SavedModel loading), which pulls in Keras 3 and, through its
scikit-learn wrappers, scikit-learn: about 1.4 s of CPU out of TensorFlow's ~5 s
import here, paid by every run, resumed run, sweep cell and pod host at start-up.
The runner only builds tf.data pipelines, so Keras is hidden from that one import.
TensorFlow already treats a missing Keras as optional there (it catches the
``ImportError``), and nothing is hidden afterwards: ``tf.keras`` and a later
``import keras`` (by a plugin criterion, say) load Keras on first use as usual.
"""

from __future__ import annotations

import sys


def import_tensorflow_without_keras() -> None:
    """Import TensorFlow now, with Keras out of its start-up; no-op if either is loaded."""
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        return
    # ``None`` in sys.modules makes ``import keras`` raise ImportError (and nothing else).
    sys.modules["keras"] = None  # type: ignore[assignment]
    try:
        import tensorflow  # noqa: F401
    finally:
        if sys.modules.get("keras", 0) is None:
            del sys.modules["keras"]


import_tensorflow_without_keras()
