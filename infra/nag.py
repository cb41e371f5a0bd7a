"""cdk-nag acknowledgments, each with the reason this product accepts the finding.

cdk-nag 3 reports through CDK's policy validation: a finding is silenced only by
``Validations.of(construct).acknowledge(...)`` on the resource or one of its parents, and a rule
with several findings per resource (``AwsSolutions-IAM5``, wildcard permissions) needs each
finding acknowledged by its exact id, e.g. ``AwsSolutions-IAM5[Resource::<DataBucket.Arn>/datasets/*]``.

:func:`acknowledge_wildcards` computes those ids the way cdk-nag does (CloudFormation references
flattened to ``<LogicalId.Attr>``) once the construct tree is complete, and acknowledges only the
findings matching the patterns the caller justifies; any other wildcard still fails synth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jsii
from aws_cdk import Acknowledgment, Aspects, CfnResource, IAspect, Stack, Validations
from aws_cdk import aws_iam as iam
from constructs import IConstruct

WILDCARD_RULE = "AwsSolutions-IAM5"


def acknowledge(scope: IConstruct, rules: Iterable[tuple[str, str]]) -> None:
    """Acknowledge ``(rule id, reason)`` pairs on ``scope`` and everything under it."""
    Validations.of(scope).acknowledge(*(Acknowledgment(id=rule, reason=reason) for rule, reason in rules))


def flatten_reference(node: Any) -> str:
    """cdk-nag's flattening of a CloudFormation value into a finding string."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(flatten_reference(i) for i in items)
        if "Fn::Sub" in node:
            return flatten_reference(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{flatten_reference(resource)}.{flatten_reference(attribute)}>"
        if "Fn::ImportValue" in node:
            return flatten_reference(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{flatten_reference(node['Ref'])}>"
    import json

    return json.dumps(node, separators=(",", ":"))


def wildcard_findings(policy_document: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for statement in policy_document.get("Statement", []) or []:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement.get("Action", [])
        for action in actions if isinstance(actions, list) else [actions]:
            if "*" in action and f"Action::{action}" not in found:
                found.append(f"Action::{action}")
        resources = statement.get("Resource", [])
        for resource in resources if isinstance(resources, list) else [resources]:
            flat = flatten_reference(resource)
            if "*" in flat and f"Resource::{flat}" not in found:
                found.append(f"Resource::{flat}")
    return found


@jsii.implements(IAspect)
class _AcknowledgeWildcards:
    def __init__(self, patterns: list[re.Pattern[str]], reason: str) -> None:
        self.patterns = patterns
        self.reason = reason

    def visit(self, node: IConstruct) -> None:
        if not CfnResource.is_cfn_resource(node):
            return
        stack = Stack.of(node)
        documents: list[dict[str, Any]] = []
        if isinstance(node, (iam.CfnPolicy, iam.CfnManagedPolicy)):
            documents.append(stack.resolve(node.policy_document))
        elif isinstance(node, iam.CfnRole) and node.policies:
            for policy in stack.resolve(node.policies) or []:
                documents.append(stack.resolve(policy.get("policyDocument") or policy.get("PolicyDocument") or {}))
        for doc in documents:
            for finding in wildcard_findings(doc or {}):
                if any(p.search(finding) for p in self.patterns):
                    acknowledge(node, [(f"{WILDCARD_RULE}[{finding}]", self.reason)])


def acknowledge_wildcards(scope: IConstruct, patterns: Iterable[str], reason: str) -> None:
    """Acknowledge the wildcard-permission findings under ``scope`` that match ``patterns``
    (regular expressions over the finding, e.g. ``Resource::.*/datasets/\\*$``)."""
    Aspects.of(scope).add(_AcknowledgeWildcards([re.compile(p) for p in patterns], reason))
