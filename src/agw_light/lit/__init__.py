"""Lightning glue: the LightningModule, the DataModule and the callbacks of a training run."""
