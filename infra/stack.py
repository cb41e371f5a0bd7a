"""The product's one stack: it composes one construct per concern and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import Stack, Tags
from constructs import Construct

from .config import ROOT, Config
from .constructs.batch import BatchInference
from .constructs.monitoring import Monitoring
from .constructs.notifications import Notifications
from .constructs.operations import PROJECT_TAG, Operations
from .constructs.registry import ModelRegistry
from .constructs.serving import Serving
from .constructs.storage import Storage
from .constructs.training_pipeline import TrainingPipeline
from .nag import acknowledge


class CxrPneumoniaStack(Stack):
    def __init__(self, scope: Construct, id: str, *, config: Config, source_root: Path = ROOT, **kwargs: Any) -> None:
        super().__init__(scope, id, description="Chest X-ray pneumonia classifier: S3 upload -> SageMaker "
                         "training -> gated promotion -> container Lambda behind API Gateway", **kwargs)
        self.config = config
        self.storage = Storage(self, "Storage", config=config)
        self.notifications = Notifications(self, "Notifications", config=config, key=self.storage.key)
        self.registry = ModelRegistry(self, "Registry", config=config)
        self.training = TrainingPipeline(self, "Training", config=config, storage=self.storage,
                                         registry=self.registry, topic=self.notifications.topic)
        self.serving = Serving(self, "Serving", config=config, storage=self.storage, registry=self.registry,
                               source_root=source_root)
        self.training.set_serving_image(self.serving.image_uri)
        self.batch = BatchInference(self, "BatchInference", config=config, storage=self.storage)
        self.monitoring = Monitoring(self, "Monitoring", config=config, api=self.serving.api,
                                     function=self.serving.function, state_machine=self.training.state_machine,
                                     dead_letters=self.training.dead_letters, topic=self.notifications.topic)
        self.operations = Operations(self, "Operations", config=config, dashboard=self.monitoring.dashboard,
                                     topic=self.notifications.topic, key=self.storage.key)
        Tags.of(self).add(*PROJECT_TAG)

        acknowledge(self, [
            ("HIPAA.Security-IAMNoInlinePolicy",
             "Every role in this stack belongs to exactly one function, the state machine or the training jobs, and "
             "its policy is written next to that resource in this code: an inline policy cannot drift onto another "
             "principal, which a shared managed policy could."),
        ])
