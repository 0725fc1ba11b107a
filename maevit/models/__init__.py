"""maevit models: MAE, encoders, masking, patch and position utilities."""
from .mae import MAEDecoder, MAEOutput, MaskedAutoencoder, masked_mse_loss
from .masking import Mask, mask_from_noise, num_visible, random_masking
from .patch import grid_shape, patchify, unpatchify
from .pos_embed import sincos_2d
from .registry import create_mae, list_models, mae_model_config
from .vit import ViTEncoder

__all__ = [
    "MAEDecoder", "MAEOutput", "MaskedAutoencoder", "masked_mse_loss", "Mask", "mask_from_noise",
    "num_visible", "random_masking", "grid_shape", "patchify", "unpatchify", "sincos_2d",
    "create_mae", "list_models", "mae_model_config", "ViTEncoder",
]
