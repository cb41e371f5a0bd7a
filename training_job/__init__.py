"""The SageMaker PyTorch training entrypoint (``train.py``) and what it is made of."""
