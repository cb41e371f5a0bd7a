"""The pipeline's steps as plain functions ``run(state, ctx) -> dict``, each with a Lambda ``handler``.

This package and :mod:`shared` are all the pipeline functions' image holds; nothing here
imports CDK. :mod:`infra.pipeline` lists the steps in order.
"""
