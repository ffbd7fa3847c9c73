"""Segment new images with a trained head: the backbone and the head on the fly, nothing cached."""
