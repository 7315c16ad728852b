"""stunet: an FP16 inference engine for Space-Time U-Net (STUNet) video diffusion models (Lumiere).

    import stunet
    cfg = stunet.STUNetConfig.from_preset("tiny")
    model = stunet.STUNet(cfg)
    out = model(x, timesteps, text_embeds)        # x (B, C, T, H, W) -> (B, 3, T, H, W)
"""
from .config import PRESETS, STUNetConfig
from .model import STUNet
from .weights import WeightsError, interpolate_spatial

__version__ = "0.1.0"
__all__ = ["STUNetConfig", "PRESETS", "STUNet", "WeightsError", "interpolate_spatial", "__version__"]
