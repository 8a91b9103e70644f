"""Our own flax.linen Stable Diffusion models (CLIP text encoder, VAE, UNet, ControlNet), the DDPM schedule, a DDIM
sampler, and numpy-only conversion from/to diffusers/transformers PyTorch weights.

Parameter trees are named like the old diffusers Flax port (`down_blocks_0/resnets_1/conv1/kernel`), so the
conversion is a plain renaming. Import the submodules directly (`from controlnet_training.flax_models import unet`);
this package imports nothing heavy by itself.
"""
