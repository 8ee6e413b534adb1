"""The paper's ablations (Tables 5–8) as model variants: measured, trained and reported."""

from cvt.ablation.runner import AblationRow, build_variant, dry_run, run_ablation
from cvt.ablation.variants import FAMILIES, PaperFigures, Variant, ablation_variants

__all__ = [
    "FAMILIES",
    "AblationRow",
    "PaperFigures",
    "Variant",
    "ablation_variants",
    "build_variant",
    "dry_run",
    "run_ablation",
]
