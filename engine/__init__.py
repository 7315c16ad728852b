"""stunet: an FP16 inference engine for Space-Time U-Net (STUNet) video diffusion models (Lumiere).

    import stunet
    cfg = stunet.STUNetConfig.from_preset("tiny")
    model = stunet.STUNet(cfg)
    out = model(x, timesteps, text_embeds)        # x (B, C, T, H, W) -> (B, 3, T, H, W)
    pipe = stunet.Pipeline(model, text_encoder)    # or Pipeline.from_pretrained("dir", ssr=..., text_encoder=...)
    stunet.save_video(pipe("a teddy bear surfing", seed=0).frames[0], "out.mp4")

Packages, in the direction data flows: ``pipeline`` (stages, conditioning, text, video) -> ``sampling``
(samplers, MultiDiffusion, the C++ runtime) -> ``backends`` (reference, compile, fast) -> ``model`` (the
reference STUNet, its execution policy, weights) -> ``kernels`` (Triton kernels and their reference math).
``distributed`` shares a pipeline's model calls among the ranks of a torch.distributed process group.
``demo`` is the small trained cascade shipped with the package (``stunet.demo.pipeline()``).
"""
from . import _checkout

_checkout.keep_top_level_kernels()  # before anything imports transformers

from . import demo, distributed, export  # noqa: E402
from .config import PRESETS, STUNetConfig  # noqa: E402
from .model import ExecutionPolicy, STUNet  # noqa: E402
from .model.weights import WeightsError, interpolate_spatial  # noqa: E402
from .pipeline import Conditioning, Pipeline, PipelineOutput, SSROptions, StageOptions, read_frames, save_video, text  # noqa: E402
from .sampling import samplers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["STUNetConfig", "PRESETS", "STUNet", "ExecutionPolicy", "Pipeline", "PipelineOutput", "StageOptions",
           "SSROptions", "Conditioning", "samplers", "text", "export", "distributed", "demo", "save_video",
           "read_frames", "WeightsError", "interpolate_spatial", "__version__"]
