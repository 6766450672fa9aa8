"""Re-id datasets: real layouts, the generated default set, samplers, transforms and the DataModule."""

from agw_light.data.datasets import ReIDDataset, build_dataset

__all__ = ["ReIDDataset", "build_dataset"]
