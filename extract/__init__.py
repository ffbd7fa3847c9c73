"""Stage 1: run the frozen diffusion backbone over every tile once and cache its decoder features."""
