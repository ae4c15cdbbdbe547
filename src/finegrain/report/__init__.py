"""Reports one layer above the engine: evaluation files, the HTML report, the model card."""
