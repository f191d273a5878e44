"""itmkit: one command line over the pipeline, the feature extractor and the trainer."""
