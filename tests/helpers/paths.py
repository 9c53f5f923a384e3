"""Where the tests find the repository and the shared CIFAR-10 copy."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Real CIFAR-10 in TFDS layout, next to the repository; tests that need it skip where absent.
SHARED_TFDS = REPO.parent / "shared" / "tfds"
