"""LMDeploy's `lmdeploy.vl` face: `load_image` and `constants.IMAGE_TOKEN`."""
from gateway.vl.image import load_image

__all__ = ["load_image"]
