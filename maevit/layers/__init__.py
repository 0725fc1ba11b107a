"""Building blocks shared by encoder families (one concept per file)."""
from .masked_conv import conv_visible, masked_conv
from .masked_norm import MaskedBatchNorm2d, MaskedGroupNorm, masked_batch_norm, masked_group_norm
from .window_group import WindowGroups, group_tokens, ungroup_tokens, window_groups

__all__ = ["MaskedBatchNorm2d", "MaskedGroupNorm", "masked_batch_norm", "masked_group_norm", "conv_visible",
           "masked_conv", "WindowGroups", "group_tokens", "ungroup_tokens", "window_groups"]
