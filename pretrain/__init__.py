"""`pathseg pretrain`: train the backbone itself on unlabelled tiles, the way the PathSegDiff LDM was trained.

Phase 1 trains the first-stage autoencoder (VQ-f4, or KL) and freezes it; phase 2 trains the
SSL-conditioned UNet on its latents with the LDM's noise schedule, conditioning dropout and EMA.
The result is an ordinary diffusers-format backbone directory for `pathseg extract --backbone DIR`.
May import `extract/` (the model definitions and the latent function), never `train_head/`.
"""
