"""Training ringserve's default model on synthetic long-context data (see docs/training.md)."""
