"""maevit: masked-autoencoder pretraining and fine-tuning of vision transformers."""
from .models import MAEOutput, MaskedAutoencoder, create_mae, list_models, patchify, unpatchify

__version__ = "0.1.0"
__all__ = ["MAEOutput", "MaskedAutoencoder", "create_mae", "list_models", "patchify", "unpatchify"]
