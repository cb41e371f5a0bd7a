"""The topic every ending of a training run and every alarm is sent to."""

from __future__ import annotations

from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

from ..config import Config
from . import output


class Notifications(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, key: kms.IKey) -> None:
        super().__init__(scope, id)
        self.topic = sns.Topic(
            self, "Topic",
            display_name=f"{config.stack_name} training and alarms",
            master_key=key,
            enforce_ssl=True,
        )
        output(self, "NotificationTopicArn", self.topic.topic_arn)
        if config.notification_email:
            # The address gets a confirmation mail first; nothing is delivered until it is confirmed.
            self.topic.add_subscription(subs.EmailSubscription(config.notification_email))
