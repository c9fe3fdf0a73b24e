"""Wiki templates and tables: render the few inline templates that carry prose
(``lang``, ``convert``, ``nowrap``, dashes...), drop the rest, drop tables.

A paragraph holding a template whose value cannot be rendered as text (a formula, a
computed date) gets `SENTINEL`, so the prose filter of embgeom.wikitext drops it.
"""
from __future__ import annotations

import re
from typing import Callable

SENTINEL = "\x00"  # marks a paragraph whose content could not be rendered (formula...)



def _split_args(inner: str) -> list[str]:
    """Split template content on ``|`` outside ``[[...]]`` links."""
    parts, depth, start = [], 0, 0
    for m in _ARG_TOKEN_RE.finditer(inner):
        tok = m.group()
        if tok == "[[":
            depth += 1
        elif tok == "]]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            parts.append(inner[start : m.start()])
            start = m.end()
    parts.append(inner[start:])
    return parts


_ARG_TOKEN_RE = re.compile(r"\[\[|\]\]|\|")
_NAMED_ARG_RE = re.compile(r"^\s*([^=\[\]{}|]+?)\s*=(.*)$", re.DOTALL)


def _template_name(head: str) -> str:
    name = " ".join(head.replace("_", " ").split()).lower()
    for prefix in ("template:", "subst:", "safesubst:", "msgnw:"):
        if name.startswith(prefix):
            name = name[len(prefix) :].strip()
    return name


def _parse_template(inner: str) -> tuple[str, list[str], dict[str, str]]:
    parts = _split_args(inner)
    name = _template_name(parts[0])
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in parts[1:]:
        m = _NAMED_ARG_RE.match(arg)
        if m:
            key, value = m.group(1).strip().lower(), m.group(2).strip()
            if key.isdigit():
                idx = int(key) - 1
                while len(positional) <= idx:
                    positional.append("")
                positional[idx] = value
            else:
                named[key] = value
        else:
            positional.append(arg.strip())
    return name, positional, named


_UNITS = {
    "c": "°C", "f": "°F", "k": "K", "c-change": "°C", "f-change": "°F",
    "km2": "km²", "m2": "m²", "sqmi": "sq mi", "sqkm": "km²", "sqft": "sq ft", "ft2": "sq ft",
    "mi2": "sq mi", "km3": "km³", "m3": "m³", "cuft": "cu ft", "acre": "acres", "kmh": "km/h",
    "km/h": "km/h", "mph": "mph", "kn": "knots", "lb": "lb", "kg": "kg", "t": "tonnes",
    "st": "st", "oz": "oz", "g": "g", "usgal": "US gallons", "impgal": "imperial gallons",
    "l": "litres", "nmi": "nautical miles", "au": "AU", "ly": "light-years", "pc": "parsecs",
}
_RANGE_WORDS = {"-": "–", "–": "–", "to": " to ", "and": " and ", "or": " or ", "by": " by ",
                "x": " × ", "×": " × ", "+": " + ", "to(-)": " to ", "+/-": " ± "}


def _pos(args: list[str], i: int, default: str = "") -> str:
    return args[i] if len(args) > i else default


def _render_convert(args: list[str], named: dict[str, str]) -> str:
    if not args:
        return ""
    if len(args) >= 4 and args[1].lower() in _RANGE_WORDS:
        value = f"{args[0]}{_RANGE_WORDS[args[1].lower()]}{args[2]}"
        unit = args[3]
    else:
        value, unit = args[0], _pos(args, 1)
    unit_text = _UNITS.get(unit.lower(), unit)
    sep = "" if unit_text.startswith("°") else " "
    return f"{value}{sep}{unit_text}".strip()


def _render_frac(args: list[str], named: dict[str, str]) -> str:
    if len(args) == 3:
        return f"{args[0]} {args[1]}/{args[2]}"
    if len(args) == 2:
        return f"{args[0]}/{args[1]}"
    if len(args) == 1:
        return f"1/{args[0]}"
    return ""


def _render_as_of(args: list[str], named: dict[str, str]) -> str:
    if not args:
        return ""
    lead = "as of" if named.get("lc", "").lower() in ("y", "yes", "1", "true") else "As of"
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    year = args[0]
    month = _pos(args, 1)
    if month.isdigit() and 1 <= int(month) <= 12:
        day = _pos(args, 2)
        date = f"{months[int(month) - 1]} {year}" if not day else f"{day} {months[int(month) - 1]} {year}"
        return f"{lead} {date}"
    return f"{lead} {year}"


def _first(args: list[str], named: dict[str, str]) -> str:
    return _pos(args, 0)


def _second(args: list[str], named: dict[str, str]) -> str:
    return _pos(args, 1)


def _last(args: list[str], named: dict[str, str]) -> str:
    return args[-1] if args else ""


def _const(text: str) -> Callable[[list[str], dict[str, str]], str]:
    return lambda args, named: text


def _nihongo(args: list[str], named: dict[str, str]) -> str:
    return _pos(args, 0) or _pos(args, 2)


_FIRST_ARG = (
    "nowrap", "nobr", "nobreak", "small", "smaller", "big", "larger", "large", "huge", "nobold",
    "noitalic", "nowiki", "sc", "smallcaps", "small caps", "em", "strong", "mvar", "var", "abbr",
    "tooltip", "not a typo", "notatypo", "proper name", "sic", "formatnum", "nts", "ntsh", "vanchor",
    "keypress", "marriage", "bold", "italic", "italic title", "linktext", "visible anchor", "'",
    "lang-en", "sub", "sup", "ill", "interlanguage link", "interlanguage link multi", "uss", "hms",
    "ship", "serif", "font", "colored", "color", "underline", "ul", "no italic", "spaces",
)
_RENDERERS: dict[str, Callable[[list[str], dict[str, str]], str]] = {
    **{name: _first for name in _FIRST_ARG},
    "lang": _second,
    "script": _second,
    "native name": _second,
    "transl": _last,
    "translit": _last,
    "resize": _last,
    "angbr": lambda a, n: f"⟨{_pos(a, 0)}⟩" if _pos(a, 0) else SENTINEL,
    "ipa": _first,
    "nihongo": _nihongo,
    "convert": _render_convert,
    "cvt": _render_convert,
    "frac": _render_frac,
    "fraction": _render_frac,
    "as of": _render_as_of,
    "circa": lambda a, n: ("c. " + _pos(a, 0)).strip(),
    "c.": lambda a, n: ("c. " + _pos(a, 0)).strip(),
    "ndash": _const("–"),
    "mdash": _const("—"),
    "mdashb": _const("—"),
    "snd": _const(" – "),
    "spnd": _const(" – "),
    "spaced ndash": _const(" – "),
    "spaced en dash": _const(" – "),
    "nbsp": _const(" "),
    "thinsp": _const(" "),
    "sp": _const(" "),
    "'": _const("'"),
    "'s": _const("'s"),
    "=": _const("="),
    "!": _const("|"),
    "pipe": _const("|"),
    "increase": _const(""),
    "decrease": _const(""),
    "steady": _const(""),
    "bce": lambda a, n: f"{_pos(a, 0)} BCE".strip(),
    "bc": lambda a, n: f"{_pos(a, 0)} BC".strip(),
    "ce": lambda a, n: f"{_pos(a, 0)} CE".strip(),
    "ad": lambda a, n: f"AD {_pos(a, 0)}".strip(),
    "uss": lambda a, n: f"USS {_pos(a, 0)}".strip(),
    "hms": lambda a, n: f"HMS {_pos(a, 0)}".strip(),
}
#: templates whose value we cannot render; the paragraph holding them is skipped
_UNRENDERABLE = {
    "math", "chem", "chem2", "ce", "inflation", "format price", "birth date", "death date",
    "birth date and age", "death date and age", "birth year and age", "dts", "val", "age",
    "start date", "end date", "bartable", "bar percent", "coord", "sqrt", "overline", "radic",
    "tmath", "formula", "fake heading", "start date and age", "#expr",
}


def _render_template(inner: str) -> str:
    name = _template_name(inner.split("|", 1)[0])
    if name in _UNRENDERABLE or name.startswith(("#expr", "#time")):
        return SENTINEL
    is_lang = name.startswith("lang-") and name != "lang-en"
    if not is_lang and name not in _RENDERERS:
        return ""  # citations, infoboxes, navigation, maintenance tags, pronunciations...
    _, args, named = _parse_template(inner)
    return _pos(args, 0) if is_lang else _RENDERERS[name](args, named)


_BRACE_TOKEN_RE = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.MULTILINE)


def expand_templates(text: str) -> str:
    """Render or drop ``{{templates}}`` (nested) and drop ``{| tables |}`` (nested)."""
    stack: list[tuple[str, list[str]]] = [("root", [])]
    pos = 0
    while True:
        m = _BRACE_TOKEN_RE.search(text, pos)
        if m is None:
            break
        tok = m.group()
        stack[-1][1].append(text[pos : m.start()])
        pos = m.end()
        if tok == "{{":
            stack.append(("tpl", []))
        elif tok == "}}":
            if not any(kind == "tpl" for kind, _ in stack):
                stack[-1][1].append(tok)  # stray: leave it, the paragraph is filtered out
                continue
            while stack[-1][0] == "table":  # a table inside a template, left open
                stack.pop()
            _, parts = stack.pop()
            stack[-1][1].append(_render_template("".join(parts)))
        elif tok.endswith("{|"):
            stack.append(("table", []))
        else:  # "|}" at a line start
            if stack[-1][0] == "table":
                stack.pop()
                stack[-1][1].append("\n")
            else:  # "|}}" ending a template: keep the "|" as text, rescan the braces
                stack[-1][1].append(tok[:-1])
                pos = m.end() - 1
    stack[-1][1].append(text[pos:])
    while len(stack) > 1:  # unclosed: keep literally; the paragraph filter drops it
        kind, parts = stack.pop()
        stack[-1][1].append(("{{" if kind == "tpl" else "{|") + "".join(parts))
    return "".join(stack[0][1])
