"""Re-id datasets: real layouts, the generated default set, samplers and transforms (the DataModule that
feeds them to Lightning is agw_light.lit.datamodule)."""

from agw_light.data.datasets import (
    DatasetSource,
    ReIDDataset,
    build_dataset,
    combine_datasets,
    register_dataset,
)

__all__ = ["DatasetSource", "ReIDDataset", "build_dataset", "combine_datasets", "register_dataset"]
