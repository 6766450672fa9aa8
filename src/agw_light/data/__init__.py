"""Re-id datasets: real layouts, the generated default set, samplers, transforms and the DataModule."""

from agw_light.data.datasets import (
    DatasetSource,
    ReIDDataset,
    build_dataset,
    combine_datasets,
    register_dataset,
)

__all__ = ["DatasetSource", "ReIDDataset", "build_dataset", "combine_datasets", "register_dataset"]
