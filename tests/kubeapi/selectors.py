"""Label and field selectors with the grammar and matching rules of k8s.io/apimachinery.

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``,
``k>N``, ``k<N``, comma-separated (all must hold). ``!=`` and ``notin`` match objects that do
not carry the key at all. Field selectors: ``f=v``, ``f==v``, ``f!=v``; a missing field reads
as the empty string; only the fields a resource declares are accepted (400 otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tests.kubeapi.errors import ApiError, bad_request

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = re.compile(rf"^(?:{_PREFIX}/)?{_NAME}$")
LABEL_VALUE = re.compile(rf"^(?:{_NAME})?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if not present:
            return False
        try:
            have, want = int(value), int(self.values[0])
        except ValueError:
            return False
        return have > want if self.op == "gt" else have < want


_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|<|>|[^\s(),!=<>]+)")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise bad_request(f"unable to parse requirement: {text!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def parse_labels(text: str | None) -> list[Requirement]:
    """Parse a label selector; raises a 400 ``ApiError`` on a malformed one."""
    if not text or not text.strip():
        return []
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def fail(why: str) -> ApiError:
        return bad_request(f"unable to parse requirement: {why}")

    def key_at(j: int) -> str:
        if j >= len(toks) or not LABEL_KEY.match(toks[j]):
            got = toks[j] if j < len(toks) else ""
            raise fail(f"invalid label key {got!r}")
        return toks[j]

    def value(v: str) -> str:
        if not LABEL_VALUE.match(v):
            raise fail(f"invalid label value: {v!r}")
        return v

    while i < len(toks):
        if toks[i] == "!":
            reqs.append(Requirement(key_at(i + 1), "!"))
            i += 2
        else:
            key = key_at(i)
            i += 1
            nxt = toks[i] if i < len(toks) else ","
            if nxt == ",":
                reqs.append(Requirement(key, "exists"))
            elif nxt in ("=", "==", "!="):
                if i + 1 >= len(toks) or toks[i + 1] in (",", "(", ")"):
                    # "k=" selects an empty value
                    reqs.append(Requirement(key, "!=" if nxt == "!=" else "=", ("",)))
                    i += 1
                else:
                    op = "!=" if nxt == "!=" else "="
                    reqs.append(Requirement(key, op, (value(toks[i + 1]),)))
                    i += 2
            elif nxt in (">", "<"):
                if i + 1 >= len(toks) or not re.fullmatch(r"-?\d+", toks[i + 1]):
                    raise fail(f"for 'Gt', 'Lt' operators, the value must be an integer: {key}")
                reqs.append(Requirement(key, "gt" if nxt == ">" else "lt", (toks[i + 1],)))
                i += 2
            elif nxt in ("in", "notin"):
                if i + 1 >= len(toks) or toks[i + 1] != "(":
                    raise fail(f"found {toks[i + 1] if i + 1 < len(toks) else ''!r}, expected: '('")
                j = i + 2
                values: list[str] = []
                while j < len(toks) and toks[j] != ")":
                    if toks[j] != ",":
                        values.append(value(toks[j]))
                    j += 1
                if j >= len(toks):
                    raise fail("found '', expected: ')'")
                reqs.append(Requirement(key, nxt, tuple(values)))
                i = j + 1
            else:
                raise fail(f"found {nxt!r}, expected: in, notin, =, ==, !=, gt, lt")
        if i < len(toks):
            if toks[i] != ",":
                raise fail(f"found {toks[i]!r}, expected: ','")
            i += 1
            if i == len(toks):
                raise fail("found '', expected: identifier after ','")
    return reqs


def labels_match(reqs: list[Requirement], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True)
class FieldTerm:
    field: str
    equal: bool
    value: str


def parse_fields(text: str | None, supported: Callable[[str], bool]) -> list[FieldTerm]:
    """Parse a field selector, accepting only fields ``supported`` admits."""
    if not text or not text.strip():
        return []
    terms: list[FieldTerm] = []
    for part in _split_unescaped(text):
        m = re.fullmatch(r"\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        field, op, raw = m.groups()
        if not supported(field):
            raise bad_request(f'field label not supported: {field}')
        terms.append(FieldTerm(field, op != "!=", _unescape(raw)))
    return terms


def fields_match(terms: list[FieldTerm], get: Callable[[str], str]) -> bool:
    return all((get(t.field) == t.value) == t.equal for t in terms)


def _split_unescaped(text: str) -> list[str]:
    parts, cur, escaped = [], "", False
    for ch in text:
        if escaped:
            cur += "\\" + ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)
