"""The reference STUNet (eager PyTorch): the source of truth every backend is checked against."""
from .layers import Cond, ResBlock, SpatialAttention, VideoGroupNorm, timestep_embedding
from .temporal import (ConvInflationBlock, TemporalAttentionBlock, TemporalConv, TemporalDown, TemporalModule,
                       TemporalUp)
from .unet import STUNet, TraceRow

__all__ = ["STUNet", "TraceRow", "Cond", "ResBlock", "SpatialAttention", "VideoGroupNorm", "timestep_embedding",
           "ConvInflationBlock", "TemporalAttentionBlock", "TemporalConv", "TemporalDown", "TemporalModule",
           "TemporalUp"]
