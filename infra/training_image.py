"""Which PyTorch training container a job runs, decided offline.

An explicit ``trainingImageUris[region]`` or ``trainingImageUri`` context value wins. Otherwise the
SageMaker Python SDK's bundled registry tables (``image_uris.retrieve``) give the Deep Learning
Container for the framework version, Python version and processor (GPU or CPU from the instance
type). The SDK reads those tables from files it ships, so no network is needed.

For a stack synthesised without a concrete region, :func:`region_table` lists the same URI for
every region the SDK knows; the stack turns it into a CloudFormation mapping looked up with
``AWS::Region`` at deploy time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from .config import Config

_ECR_URI = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.(?P<domain>amazonaws\.com(?:\.cn)?)/(?P<repo>[^:@]+)[:@].+$")


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class ImageRef:
    uri: str
    account: str | None
    region: str | None
    repository: str | None

    @classmethod
    def parse(cls, uri: str) -> ImageRef:
        m = _ECR_URI.match(uri)
        if not m:
            return cls(uri, None, None, None)
        return cls(uri, m["account"], m["region"], m["repo"])


def _sdk_image_uris():
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    os.environ.setdefault("SAGEMAKER_TELEMETRY_OPT_OUT", "true")
    from sagemaker import image_uris

    return image_uris


@lru_cache(maxsize=64)
def _retrieve(region: str, version: str, py_version: str, instance_type: str) -> str:
    try:
        return _sdk_image_uris().retrieve(
            "pytorch", region, version=version, py_version=py_version,
            instance_type=instance_type, image_scope="training")
    except ValueError as exc:
        raise ImageError(f"no PyTorch {version} {py_version} training image for {instance_type} in {region}: {exc}; "
                         "set the trainingImageUri context value") from None


def resolve(config: Config, region: str) -> str:
    """The training image URI for a concrete region."""
    return config.image_uri_for(region) or _retrieve(
        region, config.pytorch_version, config.python_version, config.training_instance_type)


def region_table(config: Config) -> dict[str, str]:
    """Region -> training image URI for every region the SDK lists, overrides applied."""
    if config.training_image_uri:
        return {}
    registries = _sdk_image_uris().config_for_framework("pytorch")["training"]
    version = registries.get("version_aliases", {}).get(config.pytorch_version, config.pytorch_version)
    regions = sorted(registries["versions"][version]["registries"])
    table = {}
    for region in regions:
        try:
            table[region] = resolve(config, region)
        except ImageError:
            continue
    table.update(config.training_image_uris)
    return table
