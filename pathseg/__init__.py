"""pathseg: segment H&E histology with a frozen, SSL-conditioned latent diffusion model as feature extractor."""

__version__ = "0.1.0"
