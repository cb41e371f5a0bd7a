"""Class names in index order: the model's output ``i`` is the logit of ``CLASS_NAMES[i]``."""

CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
POSITIVE_INDEX = CLASS_NAMES.index(POSITIVE_CLASS)


def class_index(name: str) -> int:
    """Index of a class name, matched case-insensitively (folder names vary in case)."""
    upper = name.strip().upper()
    for i, known in enumerate(CLASS_NAMES):
        if known == upper:
            return i
    raise KeyError(name)
