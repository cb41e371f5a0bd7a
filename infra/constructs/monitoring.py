"""One dashboard for serving and training, and the alarms that page the notification topic.

Serving: API latency percentiles, 4xx/5xx, the function's duration, errors, throttles and cold
starts (the ``ColdStart`` metric the inference handler emits with Powertools' embedded metric
format, namespace ``metricsNamespace``). Training: workflow runs started/succeeded/failed and the
per-epoch metrics SageMaker parses from the job log (``/aws/sagemaker/TrainingJobs``; their
``Host`` dimension names the job, so the widgets search rather than name one).
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from ..config import Config
from . import output

FIVE_MINUTES = Duration.minutes(5)
TRAINING_NAMESPACE = "/aws/sagemaker/TrainingJobs"


def _training_metric(name: str, statistic: str = "Maximum") -> cw.MathExpression:
    return cw.MathExpression(
        expression=f"SEARCH('{{{TRAINING_NAMESPACE},Host}} MetricName=\"{name}\"', '{statistic}', 300)",
        using_metrics={}, label=name, period=FIVE_MINUTES)


class Monitoring(Construct):
    def __init__(self, scope: Construct, id: str, *, config: Config, api: apigw.RestApi, function: lambda_.IFunction,
                 state_machine: sfn.StateMachine, dead_letters: sqs.IQueue, topic: sns.ITopic) -> None:
        super().__init__(scope, id)
        action = cw_actions.SnsAction(topic)

        latency = [api.metric_latency(statistic=p, period=FIVE_MINUTES, label=f"latency {p}") for p in ("p50", "p90", "p99")]
        client_errors = api.metric_client_error(statistic="Sum", period=FIVE_MINUTES, label="4xx")
        server_errors = api.metric_server_error(statistic="Sum", period=FIVE_MINUTES, label="5xx")
        requests = api.metric_count(statistic="Sum", period=FIVE_MINUTES, label="requests")
        duration = [function.metric_duration(statistic=p, period=FIVE_MINUTES, label=f"duration {p}") for p in ("p50", "p99")]
        fn_errors = function.metric_errors(statistic="Sum", period=FIVE_MINUTES, label="errors")
        throttles = function.metric_throttles(statistic="Sum", period=FIVE_MINUTES, label="throttles")
        cold_starts = cw.Metric(namespace=config.metrics_namespace, metric_name="ColdStart",
                                dimensions_map={"function_name": function.function_name, "service": config.service_name},
                                statistic="Sum", period=FIVE_MINUTES, label="cold starts")
        started = state_machine.metric_started(statistic="Sum", period=FIVE_MINUTES, label="runs started")
        succeeded = state_machine.metric_succeeded(statistic="Sum", period=FIVE_MINUTES, label="runs succeeded")
        failed = state_machine.metric_failed(statistic="Sum", period=FIVE_MINUTES, label="failed")
        timed_out = state_machine.metric_timed_out(statistic="Sum", period=FIVE_MINUTES, label="timed out")
        aborted = state_machine.metric_aborted(statistic="Sum", period=FIVE_MINUTES, label="aborted")
        unsuccessful = cw.MathExpression(expression="failed + timedOut + aborted",
                                         using_metrics={"failed": failed, "timedOut": timed_out, "aborted": aborted},
                                         label="runs failed", period=FIVE_MINUTES)
        undelivered = dead_letters.metric_approximate_number_of_messages_visible(
            statistic="Maximum", period=FIVE_MINUTES, label="marker events not started")

        self.dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=f"{config.stack_name}-overview")
        output(self, "DashboardName", self.dashboard.dashboard_name)
        self.dashboard.add_widgets(
            cw.GraphWidget(title="API latency (ms)", left=latency, width=8),
            cw.GraphWidget(title="API requests and errors", left=[requests], right=[client_errors, server_errors], width=8),
            cw.GraphWidget(title="Inference cold starts", left=[cold_starts], width=8),
        )
        self.dashboard.add_widgets(
            cw.GraphWidget(title="Inference duration (ms)", left=duration, width=8),
            cw.GraphWidget(title="Inference errors and throttles", left=[fn_errors, throttles], width=8),
            cw.GraphWidget(title="Training runs", left=[started, succeeded, unsuccessful], right=[undelivered], width=8),
        )
        self.dashboard.add_widgets(
            cw.GraphWidget(title="Validation AUC and accuracy (per epoch)",
                           left=[_training_metric("val_auc"), _training_metric("val_acc")], width=12),
            cw.GraphWidget(title="Training and validation loss (per epoch)",
                           left=[_training_metric("train_loss", "Minimum"), _training_metric("val_loss", "Minimum")],
                           width=12),
        )

        # Requests the inference handler refused as not a frontal chest X-ray (422 not_a_chest_xray), beside
        # the predictions it made: a rise means clients send the wrong files, or the population has shifted.
        served = {name: cw.Metric(namespace=config.metrics_namespace, metric_name=name, statistic="Sum",
                                  dimensions_map={"service": config.service_name}, period=FIVE_MINUTES, label=label)
                  for name, label in (("RejectedNotChestXray", "refused: not a chest X-ray"), ("Predictions", "predictions"))}
        self.dashboard.add_widgets(cw.GraphWidget(title="Refused as not a chest X-ray", left=[served["RejectedNotChestXray"]],
                                                  right=[served["Predictions"]], width=12))

        def alarm(id: str, metric: cw.IMetric, threshold: float, description: str, periods: int = 1) -> cw.Alarm:
            a = cw.Alarm(self, id, metric=metric, threshold=threshold, evaluation_periods=periods,
                         datapoints_to_alarm=periods,
                         comparison_operator=cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                         treat_missing_data=cw.TreatMissingData.NOT_BREACHING, alarm_description=description)
            a.add_alarm_action(action)
            return a

        self.alarms = {
            "InferenceErrors": alarm("InferenceErrors", fn_errors, 1,
                                     "The inference function raised instead of answering (bad input answers 4xx)."),
            # 503 before the first promotion is expected, so a burst is needed to page.
            "Api5xx": alarm("Api5xx", server_errors, 5,
                            "The API answered 5xx repeatedly: no model in service or the function is failing.", periods=2),
            "TrainingRunsFailed": alarm("TrainingRunsFailed", unsuccessful, 1,
                                        "A training run failed, timed out or was aborted; its notification has the reason."),
            "MarkersNotStarted": alarm("MarkersNotStarted", undelivered, 1,
                                       "A _READY marker event could not start a run (see the starter's dead-letter queue)."),
        }
