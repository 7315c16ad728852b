"""stunet: an FP16 inference engine for Space-Time U-Net (STUNet) video diffusion models (Lumiere).

    import stunet
    cfg = stunet.STUNetConfig.from_preset("tiny")
    model = stunet.STUNet(cfg)
    out = model(x, timesteps, text_embeds)        # x (B, C, T, H, W) -> (B, 3, T, H, W)
    pipe = stunet.Pipeline(model, text_encoder)    # or Pipeline.from_pretrained("dir", ssr=..., text_encoder=...)
    stunet.save_video(pipe("a teddy bear surfing", seed=0).frames[0], "out.mp4")
"""
from . import samplers
from .conditioning import Conditioning
from .config import PRESETS, STUNetConfig
from .model import STUNet
from .pipeline import Pipeline, PipelineOutput
from .video import save_video
from .weights import WeightsError, interpolate_spatial

__version__ = "0.1.0"
__all__ = ["STUNetConfig", "PRESETS", "STUNet", "Pipeline", "PipelineOutput", "Conditioning", "samplers",
           "save_video", "WeightsError", "interpolate_spatial", "__version__"]
