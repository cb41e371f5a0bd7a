"""The training workflow as one list of steps: the state machine is built from it, and the local
twin runs it.

A run carries one JSON *state document*. It starts as ``{"run": {...}}`` (see
:func:`infra.functions.starter.initial_state`); each step adds its result under its
``result_key``. In Step Functions that is ``ResultPath: $.<result_key>``; locally it is
``state[step.result_key] = result``.

Step kinds:

- ``lambda``: ``step.fn(state, ctx) -> dict``, a plain function from :mod:`infra.functions`. The
  cloud wraps it in a Lambda (``step.function`` names the module) invoked with the whole state,
  sized by the step's ``memory_mb``, ``timeout_s`` and ``ephemeral_mb``.
- ``training``: SageMaker CreateTrainingJob (``.sync``) in the cloud. Its result has the shape of
  :data:`TRAINING_RESULT_FIELDS`; a local runner produces the same keys from its own training run.
- ``choice``: ``step.fn(state) -> bool``; the cloud tests ``step.json_path`` for ``true``. When
  false, the run continues with the step named ``step.otherwise`` and ends there.

Every step failure (a raised exception, a failed training job) is caught: the error goes under
``$.error`` (``{"Error": name, "Cause": text}``), :data:`PIPELINE.on_failure` notifies, and the run
ends failed with the promoted model untouched.

How the local twin runs it::

    from infra.pipeline import execute
    from infra.functions.common import Clients, Settings, StepContext
    from infra.functions.starter import initial_state, marker_event

    ctx = StepContext(Settings(data_bucket=..., artifacts_bucket=..., pointer_parameter=...,
                               topic_arn=..., model_package_group=..., gate=config.gate_settings()),
                      Clients(s3=..., ssm=..., sns=..., sagemaker=...))   # loopback clients
    state = initial_state(marker_event(bucket, "datasets/demo/_READY", version_id=...), ctx.settings)
    result = execute(state, ctx, train=my_training)   # my_training(state, ctx) -> TRAINING_RESULT_FIELDS

``my_training`` runs ``training_job/train.py`` in a subprocess under the SageMaker container
contract (channels from ``state["dataset"]["channels"]``, hyperparameters from
:meth:`infra.config.Config.training_hyperparameters`), packs the bundle into ``model.tar.gz``,
uploads it and returns ``{"job_name", "status": "Completed", "model_uri", ...}``; it raises on
failure, which takes the failure path like a failed SageMaker job does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .functions import evaluate, gate, notify, promote, register, validate_dataset
from .functions.common import StepContext, error_output

StepKind = Literal["lambda", "training", "choice"]

# What the training step leaves under $.training (the state machine selects these from
# DescribeTrainingJob; a local runner returns them directly).
TRAINING_RESULT_FIELDS = {
    "job_name": "$.TrainingJobName",
    "status": "$.TrainingJobStatus",
    "model_uri": "$.ModelArtifacts.S3ModelArtifacts",
    "training_seconds": "$.TrainingTimeInSeconds",
    "billable_seconds": "$.BillableTimeInSeconds",
}


@dataclass(frozen=True)
class Step:
    """One state. A lambda step carries what its function needs to be deployed, so adding a step
    is this list plus the function's permissions (``infra.constructs.training_pipeline``)."""

    name: str
    kind: StepKind
    fn: Callable[..., Any] | None = None
    result_key: str | None = None
    function: str | None = None  # lambda: the module in infra.functions whose handler runs it
    json_path: str | None = None  # choice: the boolean Step Functions tests
    otherwise: str | None = None  # choice: the step to end with when false
    description: str = ""
    doing: str = ""  # what the run was doing while in this step, for the failure notification
    memory_mb: int = 256  # lambda: MB (Lambda: 128 to 10,240; vCPUs grow with memory, 6 at 10,240)
    timeout_s: int = 60  # lambda: seconds (at most 900)
    ephemeral_mb: int | None = None  # lambda: /tmp in MB (512 to 10,240), None for Lambda's 512


def is_approved(state: dict[str, Any]) -> bool:
    return bool(state.get("gate", {}).get("approved"))


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]
    branches: dict[str, Step] = field(default_factory=dict)
    on_failure: Step | None = None

    def step(self, name: str) -> Step:
        for s in (*self.steps, *self.branches.values(), *([self.on_failure] if self.on_failure else [])):
            if s.name == name:
                return s
        raise KeyError(name)

    def lambda_modules(self) -> list[str]:
        """The distinct function modules the workflow invokes, in first-use order."""
        return list(self.functions())

    def functions(self) -> dict[str, Step]:
        """Function module -> the first step that invokes it (its memory, timeout and description)."""
        seen: dict[str, Step] = {}
        for s in (*self.steps, *self.branches.values(), self.on_failure):
            if s is not None and s.kind == "lambda" and s.function not in seen:
                seen[s.function] = s
        return seen

    def result_order(self) -> list[tuple[str, str]]:
        """(result key, what the run was doing) in the order the main line fills the state."""
        return [(s.result_key, s.doing or s.name) for s in self.steps if s.result_key and s.kind != "choice"]


# The function EventBridge invokes for each marker; it starts the workflow and is not one of its steps.
STARTER = Step("StartRun", "lambda", None, None, "starter", memory_mb=256, timeout_s=30,
               description="starts one workflow run per _READY marker version")

PIPELINE = Pipeline(
    steps=(
        Step("ValidateDataset", "lambda", validate_dataset.run, "dataset", "validate_dataset",
             description="checks a dataset against its _READY manifest (shared.dataset)",
             doing="validating the dataset", memory_mb=1024, timeout_s=300),
        Step("TrainModel", "training", None, "training",
             description="SageMaker training job: PyTorch container, spot, checkpoints", doing="training"),
        # 10,240 MB gives the function 6 vCPUs; benchmarks/evaluate_benchmark.py measures what that scores.
        Step("EvaluateModel", "lambda", evaluate.run, "evaluation", "evaluate",
             description="scores the candidate and the model in service on the same evaluation set",
             doing="evaluating the model", memory_mb=10240, timeout_s=900, ephemeral_mb=4096),
        Step("QualityGate", "lambda", gate.run, "gate", "gate",
             description="evaluation figures against thresholds and the model in service",
             doing="the quality gate", memory_mb=256, timeout_s=60),
        Step("RegisterModel", "lambda", register.run, "registration", "register",
             description="model package, Approved or Rejected, with its metrics and inference specification",
             doing="registering the model", memory_mb=256, timeout_s=60),
        Step("IsApproved", "choice", is_approved, json_path="$.gate.approved", otherwise="NotifyRejected"),
        Step("PromoteModel", "lambda", promote.run, "promotion", "promote",
             description="points serving at the approved model", doing="promoting the model"),
        Step("NotifyPromoted", "lambda", notify.run, "notification", "notify",
             description="reports how a run ended", doing="notifying"),
    ),
    branches={"NotifyRejected": Step("NotifyRejected", "lambda", notify.run, "notification", "notify",
                                     description="reports how a run ended", doing="notifying")},
    on_failure=Step("NotifyFailure", "lambda", notify.run, "notification", "notify",
                    description="reports how a run ended", doing="notifying"),
)

STEPS = PIPELINE.steps


@dataclass
class Execution:
    status: Literal["SUCCEEDED", "FAILED"]
    state: dict[str, Any]
    path: list[str]


def execute(state: dict[str, Any], ctx: StepContext,
            train: Callable[[dict[str, Any], StepContext], dict[str, Any]],
            pipeline: Pipeline = PIPELINE) -> Execution:
    """Run the workflow in this process with the semantics of the state machine."""
    state = dict(state)
    path: list[str] = []

    def call(step: Step) -> None:
        path.append(step.name)
        fn = train if step.kind == "training" else step.fn
        state[step.result_key] = fn(state, ctx)

    try:
        for step in pipeline.steps:
            if step.kind == "choice":
                path.append(step.name)
                if not step.fn(state):
                    call(pipeline.branches[step.otherwise])
                    return Execution("SUCCEEDED", state, path)
                continue
            call(step)
    except Exception as exc:  # noqa: BLE001 - every step has a catch-all in the state machine too
        state["error"] = error_output(exc)
        if pipeline.on_failure is not None:
            call(pipeline.on_failure)
        return Execution("FAILED", state, path)
    return Execution("SUCCEEDED", state, path)
