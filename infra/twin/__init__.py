"""The local twin of the stack (contract 6): the same flow on 127.0.0.1, with no AWS account.

``python -m infra.twin`` runs it; :class:`infra.twin.twin.Twin` is the same thing as a library
(the tests drive it). What stands in for what:

=====================  ==========================================================================
cloud                  local twin
=====================  ==========================================================================
S3 buckets             SeaweedFS ``weed mini`` (a real S3 server), data under ``.twin/``
S3 event/EventBridge   a watcher of the ``_READY`` markers and the DatasetReady rule's pattern
starter Lambda         :func:`infra.functions.starter.initial_state`, one run per marker version
Step Functions         :func:`infra.pipeline.execute` over the same step list
SageMaker training     ``training_job/train.py`` in a subprocess under the container contract
registry, SSM, SNS     moto's server (its state saved under ``.twin/`` between runs)
API Gateway + Lambda   a threaded HTTP server and warm execution environments of the same handler
=====================  ==========================================================================
"""
