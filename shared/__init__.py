"""What training and serving must agree on, defined once.

- :mod:`shared.labels`: class names in index order.
- :mod:`shared.preprocessing`: the preprocessing spec (data) and the function applying it.
- :mod:`shared.imaging`: decoding and validating JPEG, PNG and DICOM bytes.
- :mod:`shared.bundle`: the model bundle format (``model.tar.gz``).
- :mod:`shared.dataset`: the dataset layout (contract 1), patient keys and the dataset fingerprint.

This package needs only numpy, Pillow and pydicom, so the serving image stays small.
"""
