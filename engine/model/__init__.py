"""The reference STUNet (eager PyTorch): the source of truth every backend is checked against."""
from .layers import Cond, ResBlock, SpatialAttention, VideoGroupNorm, from_clips, timestep_embedding, to_clips
from .memory import forward_peak_bytes
from .policy import FAST, PER_FRAME, REFERENCE, ExecutionPolicy, TextKVStore
from .temporal import (ConvInflationBlock, TemporalAttentionBlock, TemporalConv, TemporalDown, TemporalModule,
                       TemporalUp)
from .unet import STUNet, TraceRow

__all__ = ["STUNet", "TraceRow", "ExecutionPolicy", "TextKVStore", "REFERENCE", "FAST", "PER_FRAME",
           "forward_peak_bytes", "Cond", "ResBlock", "SpatialAttention", "VideoGroupNorm", "timestep_embedding",
           "to_clips", "from_clips", "ConvInflationBlock", "TemporalAttentionBlock", "TemporalConv", "TemporalDown",
           "TemporalModule", "TemporalUp"]
