"""Reference diffusion models fxq is built and tested against."""

from fxq.models.ddpm_unet import DDPMUNet

__all__ = ["DDPMUNet"]
