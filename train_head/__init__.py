"""Stage 2: train and evaluate segmentation heads from the feature store alone."""
