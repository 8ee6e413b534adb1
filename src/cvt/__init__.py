"""cvt: CvT (Convolutional vision Transformer, Wu et al. 2021) in PyTorch.

``import cvt`` registers the variants in timm's registry (``timm.create_model('cvt_13')``).
"""

from cvt.checkpoint import export_hf, load_checkpoint, load_model, save_checkpoint
from cvt.errors import CheckpointError, CvtError, DataError, InputShapeError, UsageError
from cvt.models import CvT, StageSpec, count_params, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CvT",
    "CvtError",
    "DataError",
    "InputShapeError",
    "StageSpec",
    "UsageError",
    "__version__",
    "count_params",
    "create_model",
    "export_hf",
    "list_models",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
