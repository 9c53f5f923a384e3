"""The paper's networks (Flax Linen, NHWC)."""
