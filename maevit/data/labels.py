"""Class labels travel as *names*: a labeled source's integer labels index its own sorted class list,
so two sources (training and validation data, or data and a classifier file) agree only through
their names. :func:`label_map` turns one into the other, and refuses names the model does not know.
"""
from __future__ import annotations

from typing import Sequence


class ClassMismatchError(ValueError):
    """Data holds classes that the model (or the training data) does not have."""


def label_map(data_names: Sequence[str], model_names: Sequence[str], *, data: str, model: str) -> tuple[int, ...]:
    """``out[i]`` = the model's index of the data's class ``i``.

    Args:
        data_names: the class names of the data, in the order of its integer labels.
        model_names: the class names of the model (its logits' order).
        data: what the data is, for the message (e.g. "validation data cifar10/test").
        model: what the model's classes come from (e.g. "the training data", a classifier file).

    Raises:
        ClassMismatchError: a data class is not among the model's (names both lists' differences).

    A subset is fine (a validation set with fewer classes is scored on the right ones); reordered or
    numeric folder names ("10" sorts before "2") map by name, never by position.
    """
    index = {str(n): i for i, n in enumerate(model_names)}
    unknown = [str(n) for n in data_names if str(n) not in index]
    if unknown:
        absent = [str(n) for n in model_names if str(n) not in set(map(str, data_names))]
        raise ClassMismatchError(
            f"{data} has {len(unknown)} class(es) that {model} does not have: {_few(unknown)}"
            + (f" (and lacks {_few(absent)})" if absent else "")
            + f". Its classes are matched by name against {model}'s {len(model_names)}: {_few(model_names)}. "
            "Use data with the same class folders (or shards written from them), or fine-tune a classifier "
            "on data that has these classes.")
    return tuple(index[str(n)] for n in data_names)


def _few(names: Sequence[str], n: int = 8) -> str:
    names = [str(x) for x in names]
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
