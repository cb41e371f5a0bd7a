"""Names and patterns that the stack's constructs and the local twin (``infra.twin``) share.

This module must not import the CDK (importing ``aws_cdk`` starts a Node.js process), so that the
twin can use the stack's own values instead of copies.
"""

from __future__ import annotations

from typing import Any

from shared.api import BINARY_MEDIA_TYPES  # noqa: F401  (the API contract, re-exported for the constructs)

from .functions.common import DATASETS_PREFIX, MARKER_NAME


def dataset_ready_pattern(data_bucket: str) -> dict[str, Any]:
    """The DatasetReady rule's EventBridge event pattern for the data bucket named ``data_bucket``."""
    return {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {
            "bucket": {"name": [data_bucket]},
            # Prefix datasets/ and suffix /_READY in one pattern; image uploads never match.
            # EventBridge's '*' matches any run of characters, '/' included.
            "object": {"key": [{"wildcard": f"{DATASETS_PREFIX}*/{MARKER_NAME}"}]},
        },
    }


def pointer_parameter_name(stack_name: str) -> str:
    """The SSM parameter holding the promoted-model pointer."""
    return f"/{stack_name}/promoted-model"


def model_package_group_name(stack_name: str) -> str:
    """The SageMaker model package group every trained model is registered in."""
    return f"{stack_name}-models"
