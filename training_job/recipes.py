"""Named hyperparameter sets. ``--recipe NAME`` makes one the defaults; any flag still overrides.

- ``cpu``: the entrypoint's defaults (ResNet-10 at base width 32, 160 px, 20 epochs, one-cycle
  AdamW, medium augmentation, class-balanced loss with label smoothing), chosen with
  ``benchmarks/recipe_benchmark.py`` to fit 45 minutes on 2 CPU cores (see
  ``benchmarks/results/recipes.md``).
- ``gpu``: a larger network at full resolution for a SageMaker GPU instance (ml.g4dn.xlarge,
  one T4: a few minutes of training). The stack's default hyperparameters use it.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, object]] = {
    "cpu": {},
    "gpu": {
        "architecture": "resnet18",
        "width": 0,
        "image_size": 224,
        "epochs": 40,
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "scheduler": "onecycle",
        "augment": "strong",
        "ema_decay": 0.999,
        "tta": False,
        "workers": 8,
    },
}
