"""Model surgery: a module built from ready-made fields."""

import dataclasses


def assemble(cls, **fields):
    """A module of type `cls` from ready-made fields, bypassing its random-initialising
    `__init__` (model surgery; the fields must be exactly the class's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise TypeError(f"{cls.__name__} has fields {sorted(names)}, got {sorted(fields)}")
    module = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(module, name, value)
    return module
