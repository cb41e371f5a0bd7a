"""Where trained models are recorded and which one serves.

- a SageMaker model package group: every trained model becomes a package in it, Approved or
  Rejected (contract 4);
- the promoted-model pointer: an SSM parameter holding :class:`shared.pointer.ModelPointer` JSON,
  written only by the promote step and read by the inference Lambda at cold start.
"""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from ..config import Config
from ..functions.common import UNPROMOTED
from ..names import model_package_group_name, pointer_parameter_name


class ModelRegistry(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        self.group_name = model_package_group_name(config.stack_name)
        self.group = sagemaker.CfnModelPackageGroup(
            self, "ModelPackageGroup",
            model_package_group_name=self.group_name,
            model_package_group_description="Chest X-ray NORMAL/PNEUMONIA classifiers, one package per training run",
        )
        self.pointer = ssm.StringParameter(
            self, "PromotedModel",
            parameter_name=pointer_parameter_name(config.stack_name),
            description="The model serving uses (shared.pointer.ModelPointer JSON); written by the promote step",
            # CloudFormation writes this only when it creates the parameter (the template value never
            # changes afterwards), so a redeploy never demotes the promoted model.
            string_value=UNPROMOTED,
            tier=ssm.ParameterTier.STANDARD,
        )
        # SageMaker writes model package ARNs with the group name in lower case.
        self.package_arn_pattern = stack.format_arn(
            service="sagemaker", resource="model-package", resource_name=f"{self.group_name.lower()}/*")
        self.group_arn = stack.format_arn(
            service="sagemaker", resource="model-package-group", resource_name=self.group_name.lower())
