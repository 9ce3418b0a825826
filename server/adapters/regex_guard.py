"""Compile regexes that come from untrusted adapter configs, refusing catastrophic ones.

PEFT treats `target_modules` (as a string), `exclude_modules` (as a string),
`layers_pattern` and every `rank_pattern` / `alpha_pattern` key as regexes. On a
multi-tenant server those come from uploads, and Python's `re` backtracks while
holding the GIL: a pattern like `(.*)*x` would freeze every thread of the server,
not just the loader. There is no timeout in `re`, so we refuse the shapes that can
backtrack exponentially (or with a high polynomial degree) before matching:

* an unbounded repeat whose body holds another unbounded repeat or an alternation
  (`(a+)+`, `(a|a)*`): exponential;
* the same under a bounded repeat of more than `MAX_AMBIGUOUS_REPEATS` (`(.|.){1,64}x` is
  2^n on an n-character name, `(.*){8}x` n^8), and any repeat (more than once) of a body
  holding an unbounded or wide repeat (`(.*){2}`, `(.{0,40}){8}`);
* more than `MAX_UNBOUNDED_REPEATS` unbounded repeats in one pattern
  (`.*.*.*.*.*.*x` is O(n^k));
* more than `MAX_WAYS` ways to try through its alternations (each alternation multiplies the
  ways by its choices, a bounded repeat raises them to its count): `(.|.)(.|.)...x`, 30 of
  them, is 2^30 ways on a 31-character name even without a repeat;
* back-references (matching with them is NP-hard in general);
* patterns longer than `MAX_PATTERN_CHARS`.

Module names are short (~40 chars) and few (layers x 7), so what remains is cheap.
Real-world configs (`.*\\.(q_proj|v_proj)`, `model\\.layers\\.\\d+\\..*`) pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from .errors import INVALID, AdapterError

try:  # Python >= 3.11
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 512
MAX_UNBOUNDED_REPEATS = 4
# A bounded repeat this wide backtracks like an unbounded one.
_WIDE_REPEAT = 64
# A repeat of an ambiguous body (an alternation, or a repeat) may repeat this often at most: 2^4
# ways to split a name is cheap, 2^30 (a 30-character module name) is minutes.
MAX_AMBIGUOUS_REPEATS = 4
# Real configs choose among a handful of names (`(q_proj|k_proj|v_proj)`, `(0|1|2)`): a few ways.
MAX_WAYS = 4096

_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}
if hasattr(_sre_constants, "POSSESSIVE_REPEAT"):
    _REPEATS.add(_sre_constants.POSSESSIVE_REPEAT)


def compile_config_regex(
    pattern: str, *, what: str, path: Path, prefix: str = "", suffix: str = ""
) -> re.Pattern[str]:
    """`re.compile(prefix + pattern + suffix)` after checking `pattern` as above.

    `prefix`/`suffix` are our own trusted wrapping (PEFT embeds pattern keys in
    `(.*\\.)?({key})$`). `what` names the config field in the error message, `path`
    the config file. Raises AdapterError(adapter_invalid).
    """
    if not isinstance(pattern, str):
        raise AdapterError(INVALID, f"{what}: expected a string, got {type(pattern).__name__}", path=path)
    # Length first, outside the cache: configs may carry megabytes of "pattern".
    reason = f"longer than {MAX_PATTERN_CHARS} characters" if len(pattern) > MAX_PATTERN_CHARS else None
    reason = reason or _unsafe_reason(pattern)
    if reason is not None:
        raise AdapterError(INVALID, f"{what}: regex {pattern[:80]!r} refused: {reason}", path=path)
    try:
        return _compile(prefix + pattern + suffix)
    except re.error as exc:
        raise AdapterError(INVALID, f"{what}: invalid regex {pattern[:80]!r}: {exc}", path=path) from None


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=4096)
def _unsafe_reason(pattern: str) -> str | None:
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error:
        return None  # re.compile reports it with a better message
    unbounded = 0
    for op, av in _walk(parsed):
        if op is _sre_constants.GROUPREF or op is _sre_constants.GROUPREF_EXISTS:
            return "back-references are not allowed"
        if op not in _REPEATS or _times(av) <= 1:
            continue
        wide = _is_wide(av)
        unbounded += wide
        many = wide or _times(av) > MAX_AMBIGUOUS_REPEATS
        for inner_op, inner_av in _walk(av[2]):
            if inner_op is _sre_constants.BRANCH and many:
                return "alternation inside a repeat (catastrophic backtracking)"
            if inner_op in _REPEATS and (_is_wide(inner_av) or (many and _times(inner_av) > 1)):
                return "nested repeats (catastrophic backtracking)"
    if unbounded > MAX_UNBOUNDED_REPEATS:
        return f"more than {MAX_UNBOUNDED_REPEATS} unbounded repeats (slow backtracking)"
    if _ways(parsed) > MAX_WAYS:
        return f"more than {MAX_WAYS} ways through its alternations (catastrophic backtracking)"
    return None


def _ways(sub) -> float:
    """An upper bound of the paths a backtracking match may try through `sub`'s alternations:
    a sequence multiplies, an alternation adds its choices' ways, a bounded repeat raises its
    body's ways to its count (an unbounded repeat holds no alternation: refused above)."""
    ways = 1.0
    for op, av in sub:
        if op is _sre_constants.BRANCH:
            ways *= sum(_ways(choice) for choice in av[1])
        elif op in _REPEATS:
            inner = _ways(av[2])
            if inner > 1.0:
                if inner > MAX_WAYS or _times(av) > _WIDE_REPEAT:
                    return float("inf")
                ways *= inner ** _times(av)  # at most 4096^64: a float
        else:
            ways *= max((_ways(child) for child in _subpatterns(av)), default=1.0)
        if ways > MAX_WAYS:
            return ways
    return ways


def _times(repeat_av: tuple) -> float:
    """The most times a repeat repeats (inf: unbounded)."""
    hi = repeat_av[1]
    return float("inf") if hi is _sre_constants.MAXREPEAT else hi


def _is_wide(repeat_av: tuple) -> bool:
    _lo, hi, _body = repeat_av
    return hi is _sre_constants.MAXREPEAT or hi > _WIDE_REPEAT


def _walk(sub) -> Iterator[tuple]:
    """Every (opcode, argument) in a parsed pattern, depth first."""
    for op, av in sub:
        yield op, av
        yield from (item for child in _subpatterns(av) for item in _walk(child))


def _subpatterns(av) -> Iterator:
    # Argument layouts differ per opcode and Python version; SubPatterns may sit
    # anywhere inside nested tuples/lists, so look for them structurally.
    if isinstance(av, _sre_parse.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _subpatterns(item)
