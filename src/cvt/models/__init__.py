"""CvT models: layers, the model class, official spec mapping and the named variants."""

from cvt.models.cvt import CvT, CvTStage, StageSpec, count_params, expand_stages
from cvt.models.official_spec import stages_from_official_spec
from cvt.models.variants import create_model, list_models

__all__ = [
    "CvT",
    "CvTStage",
    "StageSpec",
    "count_params",
    "create_model",
    "expand_stages",
    "list_models",
    "stages_from_official_spec",
]
