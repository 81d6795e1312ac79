"""Reference diffusion models fxq is built and tested against."""

from fxq.models.ddpm_unet import DDPMUNet
from fxq.models.pretrained import pretrained, save_pretrained

__all__ = ["DDPMUNet", "pretrained", "save_pretrained"]
