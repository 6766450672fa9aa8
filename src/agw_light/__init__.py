"""AGW person re-identification with light-reid's speed-ups, on PyTorch Lightning."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`agw_light.Encoder` on first use, so `import agw_light` (and every command's --help) stays light."""
    if name == "Encoder":
        from agw_light.inference import Encoder

        return Encoder
    raise AttributeError(f"module 'agw_light' has no attribute {name!r}")
