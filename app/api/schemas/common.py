"""Reusable field types: KVM integers (number, decimal or "0x…" string) and named constants.

A field is range-checked only against the width of the kernel struct member it stands for
(`__u32`, `__u64`): a value the ioctl could not even receive is a malformed body (422). A
value that fits is passed on and the engine answers what KVM answers for it (EINVAL, …).
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from app.api.input_limits import strict_booleans

_INT_STR = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)$")
# Python's int() refuses to parse huge decimal strings anyway; this also bounds the work.
_MAX_INT_STR = 64


def _decimal_up_to(n: int) -> str:
    """A regex (no anchors) for the decimal numbers 0..n, leading zeros allowed."""
    digits = str(n)
    shorter = f"[0-9]{{1,{len(digits) - 1}}}" if len(digits) > 1 else None
    alts = [shorter] if shorter else []
    for i, d in enumerate(digits):
        low = "1" if i == 0 and len(digits) > 1 else "0"
        if int(d) > int(low):
            rest = len(digits) - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            alts.append(f"{digits[:i]}[{low}-{int(d) - 1}]{tail}")
    alts.append(digits)
    return "0*(" + "|".join(alts) + ")"


def int_string_pattern(bits: int) -> str:
    """Exactly the strings `parse_int` takes for an unsigned `bits`-bit field: decimal or
    "0x…" hex, leading zeros allowed (the schema and the parser must agree, both ways)."""
    hexdigits = -(-bits // 4)
    top = "" if bits % 4 == 0 else f"[0-{(1 << (bits % 4)) - 1}]"
    if not top:
        hexpart = f"0*[0-9a-fA-F]{{1,{hexdigits}}}"
    elif hexdigits == 1:
        hexpart = f"0*{top}"
    else:
        hexpart = f"0*([0-9a-fA-F]{{1,{hexdigits - 1}}}|{top}[0-9a-fA-F]{{{hexdigits - 1}}})"
    return f"^(0[xX]{hexpart}|{_decimal_up_to((1 << bits) - 1)})$"


INT_STRING_PATTERN = int_string_pattern(64)


def parse_int(value: Any) -> Any:
    """A JSON number, or a decimal / "0x…" string, to an int; ValueError (→ 422) otherwise.
    Floats pass only when they are exact integers: 2**64 as a double is not."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= 2**53:
            return int(value)
        raise ValueError("expected an integer (a float is exact only up to 2**53)")
    if isinstance(value, str):
        if len(value) > _MAX_INT_STR or not _INT_STR.match(value):
            raise ValueError('expected an integer: a number, decimal string or "0x…" hex string')
        return int(value, 16) if value[:2].lower() == "0x" else int(value)
    raise ValueError('expected an integer: a number, decimal string or "0x…" hex string')


def _int_string(bits: int) -> dict[str, Any]:
    return {"type": "string", "pattern": int_string_pattern(bits), "maxLength": _MAX_INT_STR}


def _int_schema(bits: int, description: str) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": (1 << bits) - 1},
            _int_string(bits),
        ],
        "description": description,
    }


def _ranged(parse: Any, bits: int) -> Any:
    maximum = (1 << bits) - 1

    def validate(value: Any) -> Any:
        if type(value) is int and 0 <= value <= maximum:  # the common case, at once
            return value
        v = parse(value)
        if isinstance(v, int) and not 0 <= v <= maximum:
            raise ValueError(f"{v} does not fit an unsigned {bits}-bit field")
        return v

    return validate


def int_validator(bits: int) -> BeforeValidator:
    return BeforeValidator(_ranged(parse_int, bits))


def int_schema(bits: int) -> WithJsonSchema:
    return WithJsonSchema(_int_schema(bits, f'unsigned {bits}-bit integer: a number or "0x…"'))


U64 = Annotated[int, int_validator(64), int_schema(64)]
U32 = Annotated[int, int_validator(32), int_schema(32)]


# --- named constants ------------------------------------------------------------------


def _names_of(members: Mapping[str, int]) -> list[str]:
    return sorted(members, key=lambda n: (members[n], n))


def parse_constant(members: Mapping[str, int]) -> Any:
    def validate(value: Any) -> Any:
        if isinstance(value, str) and value in members:
            return members[value]
        if isinstance(value, str) and not _INT_STR.match(value):
            raise ValueError(f"unknown name {value[:64]!r}; known: {', '.join(_names_of(members))}")
        return parse_int(value)

    return validate


def constant_validator(members: Mapping[str, int], bits: int) -> BeforeValidator:
    return BeforeValidator(_ranged(parse_constant(members), bits))


def constant_schema(members: Mapping[str, int], bits: int, what: str) -> WithJsonSchema:
    """A constant given by its kernel name or by number (numbers are not limited to the
    names: the engine answers for an unknown value what KVM would)."""
    maximum = (1 << bits) - 1
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": _names_of(members)},
                {"type": "integer", "minimum": 0, "maximum": maximum},
                _int_string(bits),
            ],
            "description": f"{what}: the kernel's name or its number",
        }
    )


def parse_flags(members: Mapping[str, int]) -> Any:
    def validate(value: Any) -> Any:
        if isinstance(value, list):
            if len(value) > 64:
                raise ValueError("too many flag names")
            mask = 0
            for name in value:
                if not isinstance(name, str) or name not in members:
                    shown = str(name)[:64]
                    raise ValueError(
                        f"unknown flag {shown!r}; known: {', '.join(_names_of(members))}"
                    )
                mask |= members[name]
            return mask
        if isinstance(value, str) and value in members:
            return members[value]
        return parse_int(value)

    return validate


def flags_validator(members: Mapping[str, int], bits: int) -> BeforeValidator:
    return BeforeValidator(_ranged(parse_flags(members), bits))


def flags_schema(members: Mapping[str, int], bits: int, what: str) -> WithJsonSchema:
    """A bit mask given as a number, a "0x…" string, or a list of the kernel's names. Bits
    without a name are allowed through a number: rejecting them is KVM's job (EINVAL)."""
    maximum = (1 << bits) - 1
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": maximum},
                _int_string(bits),
                {
                    "type": "array",
                    "items": {"type": "string", "enum": _names_of(members)},
                    "maxItems": 64,
                },
            ],
            "description": f"{what}: a number or a list of the kernel's names",
        }
    )


def enum_members(*enums: Iterable[enum.Enum]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in enums:
        for m in e:
            if m.name:
                out[m.name] = int(m.value)
    return out


# --- byte payloads -------------------------------------------------------------------

_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")


def parse_hex(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    s = value[2:] if value[:2].lower() == "0x" else value
    if not _HEX.match(s):
        raise ValueError("expected an even number of hex digits")
    return s.lower()


HexData = Annotated[
    str,
    BeforeValidator(parse_hex),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^(0[xX])?([0-9a-fA-F]{2})*$",
            "description": "bytes as hex digits, two per byte",
        }
    ),
]


def parse_base64(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("expected base64 (standard alphabet, padded)") from e
    return value


Base64Data = Annotated[
    str,
    BeforeValidator(parse_base64),
    WithJsonSchema(
        {
            "type": "string",
            "format": "byte",
            "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
            "description": "base64 of little-endian u64 words",
        }
    ),
]


# --- shared models -------------------------------------------------------------------


class Body(BaseModel):
    """Request bodies reject unknown fields: a typo must not silently mean 'default'."""

    model_config = ConfigDict(extra="forbid")
    flags_are_booleans = model_validator(mode="before")(strict_booleans)


UNDECLARED_LOG = logging.getLogger("vkmmu.api.undeclared")


class Answer(BaseModel):
    """A response model: every field declared, nothing else (`additionalProperties: false`).
    A key of an engine answer that the model lacks is dropped with a warning on
    `vkmmu.api.undeclared` (the API tests fail on it) rather than failing the call."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, json_schema_extra={"additionalProperties": False}
    )

    @model_validator(mode="before")
    @classmethod
    def _warn_undeclared(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = _known_keys(cls)
            extra = sorted(str(k) for k in data if k not in known)
            if extra:
                UNDECLARED_LOG.warning("%s: undeclared answer fields %s", cls.__name__, extra)
        return data


_KNOWN: dict[type, frozenset[str]] = {}


def _known_keys(cls: type[BaseModel]) -> frozenset[str]:
    """The keys a model declares (names and aliases), computed once per model: a batch
    answer validates thousands of them."""
    known = _KNOWN.get(cls)
    if known is None:
        fields = cls.model_fields
        known = _KNOWN[cls] = frozenset({f.alias or n for n, f in fields.items()} | set(fields))
    return known


class LevelCounts(Answer):
    """Counts by mapping level."""

    k4: int = Field(alias="4k", description="4 KiB (level 1)")
    m2: int = Field(alias="2m", description="2 MiB (level 2)")
    g1: int = Field(alias="1g", description="1 GiB (level 3)")


Limit = Annotated[int, Field(ge=1, le=1000, description="Page size (1–1000).")]

# Ids and cursors are opaque, but only ever made of these: anything else (a NUL byte, which
# PostgreSQL refuses in text, among them) is malformed, not merely unknown.
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# Free text that is stored (VM names): printable, no control characters.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
