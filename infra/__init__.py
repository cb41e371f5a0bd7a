"""The cloud side: the CDK app, its constructs, the pipeline's small functions and the launch command.

Importing this package imports nothing heavy: :mod:`infra.functions` runs inside Lambda without
CDK, and the CDK modules are imported only by the app.
"""
