"""AGW person re-identification with light-reid's speed-ups, on PyTorch Lightning."""

__version__ = "0.1.0"
