"""Checks shared by the option dataclasses (`SearchConfig`, `TrainConfig`): each bad value is a
`ValueError` naming the field and the value."""

import dataclasses


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_ints(config, *names: str, optional: bool = False) -> None:
    """Each field is an integer >= 1 (or None when `optional`)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not _is_int(value) or value < 1:
            tail = " or None" if optional else ""
            raise ValueError(f"`{name}` (={value!r}) must be a positive integer{tail}")


def positive(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"`{name}` (={getattr(config, name)!r}) must be positive")


def non_negative(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name) >= 0:
            raise ValueError(f"`{name}` (={getattr(config, name)!r}) must be non-negative")


def replace_known(config, what: str, changes: dict):
    """`dataclasses.replace(config, **changes)`; unknown option names are an error naming them."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config, **changes)
