"""Lightning glue: the LightningModule and the callbacks of a training run."""
