"""What every operation is: a frozen value with a journal name and a JSON form.

Each ioctl-level call is a frozen dataclass declared beside the concept it changes
(`SetUserMemoryRegion` in `memslots.py`, `Access` in `faults.py`, …) with the `@operation`
decorator. `NAME` is the string the journal has always stored in its `op` column, and
`to_json()`/`from_json()` are the `args` column: every record written since the first journal
reads back into the same operation (`ops.parse`).

`from_json` checks the record's shape (an object, no unknown key, every required key), as
binding keyword arguments did. The values are checked by the operation's handler, in the
kernel's order, so a value of the wrong type fails with the errno the ioctl gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, dataclass_transform

from .errors import einval

_O = TypeVar("_O", bound="Op")


class Op:
    """Base of every operation: `NAME`, and the JSON form the journal keeps."""

    __slots__ = ()
    NAME: ClassVar[str]
    # Field names, and the ones without a default: computed once by `@operation`.
    FIELDS: ClassVar[tuple[str, ...]] = ()
    FIELD_SET: ClassVar[frozenset[str]] = frozenset()
    REQUIRED: ClassVar[frozenset[str]] = frozenset()

    @property
    def name(self) -> str:
        return self.NAME

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_json(cls: type[_O], args: object) -> _O:
        if type(args) is dict and args.keys() == cls.FIELD_SET:
            return cls(**args)  # every field, as the journal stores them: nothing to check
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise einval("args must be an object")
        names = cls.FIELDS
        for key in args:
            if key not in names:
                raise einval(f"{cls.NAME}: got an unexpected keyword argument {key!r}")
        missing = cls.REQUIRED.difference(args)
        if missing:
            raise einval(f"{cls.NAME}: missing a required argument: {min(missing)!r}")
        return cls(**args)


REGISTRY: dict[str, type[Op]] = {}


@dataclass_transform(frozen_default=True)
def operation(name: str) -> Callable[[type[_O]], type[_O]]:
    """Make `cls` a frozen dataclass operation journaled as `name`."""

    def wrap(cls: type[_O]) -> type[_O]:
        dc = dataclasses.dataclass(frozen=True, slots=True)(cls)
        dc.NAME = name
        fields = dataclasses.fields(dc)  # type: ignore[arg-type]
        dc.FIELDS = tuple(f.name for f in fields)
        dc.FIELD_SET = frozenset(dc.FIELDS)
        dc.REQUIRED = frozenset(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if name in REGISTRY:
            raise RuntimeError(f"operation {name!r} declared twice")
        REGISTRY[name] = dc
        return dc

    return wrap
