"""What the service's answers look like, and what it costs: dashboard rows, alarms and a budget.

Added to the overview dashboard (:class:`~infra.constructs.monitoring.Monitoring`):

- answers by label (``PredictionsByLabel``, one metric per label) and the share of PNEUMONIA
  answers against the band ``predictionMixBand`` sets;
- refusals (``RejectedRequests``: every 4xx the function answers), 503s (``ModelUnavailable``) and
  model fallbacks (``ModelFallback``: the promoted model could not load and the previous approved
  one serves), all from the inference handler's embedded metrics (namespace ``metricsNamespace``,
  dimension ``service``).

Alarms, to the notification topic:

- ``ModelUnavailableBurst``: ten or more 503s in five minutes (a few during a model switch are expected);
- ``ModelFallback``: any fallback, which means the promoted model is broken;
- ``PredictionMixDrift``: over a window of ``window_hours``, with at least ``min_predictions``
  answers, the share of PNEUMONIA answers left [``low``, ``high``]: the population sent to the
  service or its images changed, or the model did (README, "Operations").

With ``monthlyBudgetUsd`` > 0, an AWS Budgets cost budget for the stack's ``project`` tag mails the
topic at 80 % of actual and 100 % of forecast spend.
"""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from constructs import Construct

from shared.labels import CLASS_NAMES

from ..config import Config

FIVE_MINUTES = Duration.minutes(5)
PROJECT_TAG = ("project", "cxr-pneumonia")
POSITIVE = "PNEUMONIA"


class Operations(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, dashboard: cw.Dashboard, topic: sns.ITopic,
                 key: kms.IKey) -> None:
        super().__init__(scope, id)
        self.config = config
        action = cw_actions.SnsAction(topic)

        def handler_metric(name: str, title: str, period: Duration = FIVE_MINUTES, **dims: str) -> cw.Metric:
            return cw.Metric(namespace=config.metrics_namespace, metric_name=name,
                             dimensions_map={"service": config.service_name, **dims},
                             statistic="Sum", period=period, label=title)

        by_label = [handler_metric("PredictionsByLabel", name, label=name) for name in CLASS_NAMES]
        refused = handler_metric("RejectedRequests", "refused (4xx from the function)")
        unavailable = handler_metric("ModelUnavailable", "503 model unavailable")
        fallbacks = handler_metric("ModelFallback", "fallbacks to the previous model")

        band = config.prediction_mix()
        window = Duration.hours(band["window_hours"])
        positive = handler_metric("PredictionsByLabel", POSITIVE, period=window, label=POSITIVE)
        others = {f"n{i}": handler_metric("PredictionsByLabel", name, period=window, label=name)
                  for i, name in enumerate(n for n in CLASS_NAMES if n != POSITIVE)}
        total = " + ".join(["FILL(p, 0)", *(f"FILL({k}, 0)" for k in others)])
        share = cw.MathExpression(expression=f"FILL(p, 0) / ({total})", using_metrics={"p": positive, **others},
                                  label=f"share of {POSITIVE} answers ({band['window_hours']} h)", period=window)
        outside = cw.MathExpression(
            expression=(f"IF(({total}) >= {band['min_predictions']} AND "
                        f"(FILL(p, 0) / ({total}) < {band['low']} OR FILL(p, 0) / ({total}) > {band['high']}), 1, 0)"),
            using_metrics={"p": positive, **others}, label="share outside its band", period=window)

        dashboard.add_widgets(
            cw.GraphWidget(title="Answers by label", left=by_label, stacked=True, width=8),
            cw.GraphWidget(title=f"Share of {POSITIVE} answers", left=[share], width=8,
                           left_y_axis=cw.YAxisProps(min=0, max=1),
                           left_annotations=[cw.HorizontalAnnotation(value=band["low"], label="band low"),
                                             cw.HorizontalAnnotation(value=band["high"], label="band high")]),
            cw.GraphWidget(title="Refusals, 503s and model fallbacks", left=[refused, unavailable], right=[fallbacks],
                           width=8),
        )

        def alarm(id: str, metric: cw.IMetric, threshold: float, description: str) -> cw.Alarm:
            a = cw.Alarm(self, id, metric=metric, threshold=threshold, evaluation_periods=1, datapoints_to_alarm=1,
                         comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                         treat_missing_data=cw.TreatMissingData.NOT_BREACHING, alarm_description=description)
            a.add_alarm_action(action)
            return a

        self.alarms = {
            "ModelUnavailableBurst": alarm(
                "ModelUnavailableBurst", unavailable, 10,
                "Ten or more 503 answers in five minutes: no model can be loaded (see the function's log)."),
            "ModelFallback": alarm(
                "ModelFallback", fallbacks, 1,
                "The promoted model could not be loaded and the previous approved model is serving; roll back or "
                "promote a working model."),
            "PredictionMixDrift": alarm(
                "PredictionMixDrift", outside, 1,
                f"The share of {POSITIVE} answers over {band['window_hours']} h left [{band['low']}, {band['high']}] "
                "(predictionMixBand): the images sent or the population changed, or the model did."),
        }

        self.budget = self._budget(topic, key) if config.monthly_budget_usd > 0 else None

    def _budget(self, topic: sns.ITopic, key: kms.IKey) -> budgets.CfnBudget:
        # Budgets publishes to the topic and so must be able to use the topic's KMS key.
        source = {"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}
        topic.add_to_resource_policy(iam.PolicyStatement(
            sid="BudgetsPublish", actions=["sns:Publish"], resources=[topic.topic_arn],
            principals=[iam.ServicePrincipal("budgets.amazonaws.com")], conditions=source))
        key.add_to_resource_policy(iam.PolicyStatement(
            sid="BudgetsUseKey", actions=["kms:GenerateDataKey*", "kms:Decrypt"], resources=["*"],
            principals=[iam.ServicePrincipal("budgets.amazonaws.com")], conditions=source))
        tag, value = PROJECT_TAG
        subscribers = [budgets.CfnBudget.SubscriberProperty(subscription_type="SNS", address=topic.topic_arn)]
        return budgets.CfnBudget(
            self, "MonthlyBudget",
            budget=budgets.CfnBudget.BudgetDataProperty(
                budget_name=f"{self.config.stack_name}-monthly", budget_type="COST", time_unit="MONTHLY",
                budget_limit=budgets.CfnBudget.SpendProperty(amount=self.config.monthly_budget_usd, unit="USD"),
                cost_filters={"TagKeyValue": [f"user:{tag}${value}"]}),
            notifications_with_subscribers=[
                budgets.CfnBudget.NotificationWithSubscribersProperty(
                    notification=budgets.CfnBudget.NotificationProperty(
                        notification_type=kind, comparison_operator="GREATER_THAN", threshold=percent,
                        threshold_type="PERCENTAGE"),
                    subscribers=subscribers)
                for kind, percent in (("ACTUAL", 80), ("FORECASTED", 100))],
        )
