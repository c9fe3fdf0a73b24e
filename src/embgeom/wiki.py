"""The demo's real English corpus: Wikipedia articles and news text shipped with gensim.

gensim's wheel carries two small English corpora as test data, which makes a demo
that runs offline on real natural text:

* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: a
  shortened Wikipedia dump (about 200 articles, "A" titles, 2016). We stream the
  XML, strip the wiki markup to plain prose with its case and punctuation intact
  (subword tokenizers need natural text, so gensim's lowercasing tokenizer is of no
  use here), and yield one document per paragraph;
* ``lee_background.cor``: 300 Australian news stories (Lee et al. 2005), one per line.

gensim is located with :func:`importlib.util.find_spec`; it is never imported.

The stripping is a small purpose-built wikitext reader, not a MediaWiki renderer:
templates are dropped, except a few inline ones that carry prose (``lang``,
``convert``, ``nowrap``, dashes...), which are rendered. Paragraphs that still look
like markup, hold a formula, are short, do not end a sentence, or are mostly
non-Latin script are skipped, so what comes out is clean running English.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator

from ._atomic import atomic_writer
from .errors import EmbgeomError

__all__ = [
    "WIKI_FILE",
    "LEE_FILE",
    "gensim_test_data_dir",
    "wiki_path",
    "lee_path",
    "iter_wiki_articles",
    "strip_wiki_markup",
    "wiki_paragraphs",
    "wiki_documents",
    "lee_documents",
    "write_demo_corpus",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"

#: paragraphs with fewer whitespace-separated words than this are skipped
DEFAULT_MIN_WORDS = 20

_SENTINEL = "\x00"  # marks a paragraph whose content could not be rendered (formula...)


# --------------------------------------------------------------------------- locating the data


def gensim_test_data_dir() -> Path:
    """The folder of gensim's bundled test data, found without importing gensim."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbgeomError(
            "the demo corpus comes from gensim's bundled test data, but gensim is not installed; "
            "pip install 'gensim>=4.3' (or pip install 'embgeom[demo]'), or pass your own --corpus"
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "test" / "test_data"
        if d.is_dir():
            return d
    raise EmbgeomError(
        f"gensim is installed at {list(spec.submodule_search_locations)} but has no test/test_data "
        "folder; reinstall it from a wheel (pip install --force-reinstall 'gensim>=4.3') or pass "
        "your own --corpus"
    )


def _data_file(name: str) -> Path:
    p = gensim_test_data_dir() / name
    if not p.is_file():
        raise EmbgeomError(
            f"gensim's test data file {p} is missing; reinstall gensim "
            "(pip install --force-reinstall 'gensim>=4.3') or pass your own --corpus"
        )
    return p


def wiki_path() -> Path:
    """Path of the shortened English Wikipedia dump shipped with gensim."""
    return _data_file(WIKI_FILE)


def lee_path() -> Path:
    """Path of the Lee background news corpus shipped with gensim."""
    return _data_file(LEE_FILE)


# --------------------------------------------------------------------------- the XML dump


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_DISAMBIG_RE = re.compile(
    r"\{\{\s*(?:disambig\w*|dab|hndis|geodis|numberdis|letter-number combination disambiguation|"
    r"set index article|sia|surname|given name)\s*[|}]",
    re.IGNORECASE,
)


def iter_wiki_articles(path: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` of the main-namespace articles of a MediaWiki XML dump.

    ``path`` defaults to gensim's shortened dump; ``.bz2`` is decompressed on the fly.
    The XML is parsed incrementally and each page is freed once read. Redirects,
    pages outside the article namespace, and disambiguation/name-list pages are skipped.
    """
    p = Path(path) if path is not None else wiki_path()
    opener: Callable = bz2.open if p.suffix == ".bz2" else open
    try:
        fh = opener(p, "rb")
    except OSError as exc:
        raise EmbgeomError(f"cannot read the Wikipedia dump {p}: {exc}") from exc
    with fh:
        try:
            context = ET.iterparse(fh, events=("start", "end"))
            root = None
            for event, elem in context:
                if event == "start":
                    if root is None:
                        root = elem
                    continue
                if _local(elem.tag) != "page":
                    continue
                title = ns = text = None
                redirect = False
                for child in elem.iter():
                    name = _local(child.tag)
                    if name == "title":
                        title = child.text or ""
                    elif name == "ns":
                        ns = (child.text or "").strip()
                    elif name == "redirect":
                        redirect = True
                    elif name == "text":
                        text = child.text or ""
                elem.clear()
                if root is not None:
                    root.clear()  # drop references to finished pages
                if redirect or ns not in (None, "0") or not text:
                    continue
                if text.lstrip()[:9].lower() == "#redirect":
                    continue
                if "(disambiguation)" in (title or "") or _DISAMBIG_RE.search(text):
                    continue
                yield title or "", text
        except (ET.ParseError, OSError, EOFError) as exc:
            raise EmbgeomError(
                f"the Wikipedia dump {p} is damaged ({exc}); reinstall gensim or pass your own --corpus"
            ) from None


# --------------------------------------------------------------------------- templates and tables


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
    "angbr": lambda a, n: f"⟨{_pos(a, 0)}⟩" if _pos(a, 0) else _SENTINEL,
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
        return _SENTINEL
    is_lang = name.startswith("lang-") and name != "lang-en"
    if not is_lang and name not in _RENDERERS:
        return ""  # citations, infoboxes, navigation, maintenance tags, pronunciations...
    _, args, named = _parse_template(inner)
    return _pos(args, 0) if is_lang else _RENDERERS[name](args, named)


_BRACE_TOKEN_RE = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.MULTILINE)


def _expand_templates(text: str) -> str:
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


# --------------------------------------------------------------------------- links

_DROP_NAMESPACES = {
    "file", "image", "media", "category", "categoría", "kategorie", "catégorie",
    "special", "template", "help", "portal", "user", "talk", "module", "mediawiki", "draft",
}
_INTERWIKI = {
    "wikt", "wiktionary", "w", "wikipedia", "wp", "s", "wikisource", "q", "wikiquote", "b",
    "wikibooks", "n", "wikinews", "v", "wikiversity", "voy", "wikivoyage", "species",
    "wikispecies", "commons", "c", "meta", "m", "d", "wikidata", "mw", "mediawikiwiki",
}
_LANG_PREFIX_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]+)*$|^simple$")
_LINK_TOKEN_RE = re.compile(r"\[\[|\]\]")


def _render_link(inner: str) -> str:
    colon_lead = inner.startswith(":")
    body = inner[1:] if colon_lead else inner
    target, pipe, label = body.partition("|")
    prefix, colon, rest = target.partition(":")
    prefix_l = prefix.strip().lower()
    if colon and not colon_lead:
        if prefix_l in _DROP_NAMESPACES:
            return ""
        if prefix_l not in _INTERWIKI and _LANG_PREFIX_RE.match(prefix_l) and not pipe:
            return ""  # interlanguage link
    if pipe:
        label = label.strip()
        if label:
            return label
        # pipe trick: [[Foo (bar)|]] -> Foo; [[ns:Foo|]] -> Foo
        shown = rest if colon else target
        return re.sub(r"\s*\(.*\)\s*$", "", shown).strip()
    if colon and (prefix_l in _INTERWIKI or colon_lead):
        shown = rest if prefix_l in _INTERWIKI else target
    else:
        shown = target
    page, _, anchor = shown.partition("#")
    return (page or anchor).strip()


def _expand_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; files, categories and
    interlanguage links (with anything nested inside) are dropped."""
    stack: list[list[str]] = [[]]
    pos = 0
    for m in _LINK_TOKEN_RE.finditer(text):
        stack[-1].append(text[pos : m.start()])
        pos = m.end()
        if m.group() == "[[":
            stack.append([])
        elif len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(_render_link(inner))
        else:
            stack[-1].append("]]")
    stack[-1].append(text[pos:])
    while len(stack) > 1:
        parts = stack.pop()
        stack[-1].append("[[" + "".join(parts))
    return "".join(stack[0])


# --------------------------------------------------------------------------- the whole page

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_DROP_TAGS = (
    "ref", "references", "gallery", "timeline", "syntaxhighlight", "source", "pre", "imagemap",
    "graph", "mapframe", "maplink", "templatedata", "includeonly", "onlyinclude", "table",
    "inputbox", "categorytree", "ul", "ol", "dl",
)
_SENTINEL_TAGS = ("math", "chem", "ce", "score", "hiero", "code", "var")
_SELF_CLOSING_RE = re.compile(
    r"<\s*(?:%s)\b[^>]*/\s*>" % "|".join(_DROP_TAGS + _SENTINEL_TAGS), re.IGNORECASE
)
_DROP_TAG_RE = re.compile(
    r"<\s*(%s)\b[^>]*>.*?<\s*/\s*\1\s*>" % "|".join(_DROP_TAGS), re.IGNORECASE | re.DOTALL
)
_SENTINEL_TAG_RE = re.compile(
    r"<\s*(%s)\b[^>]*>.*?<\s*/\s*\1\s*>" % "|".join(_SENTINEL_TAGS), re.IGNORECASE | re.DOTALL
)
_NOWIKI_RE = re.compile(r"<\s*nowiki\s*>(.*?)<\s*/\s*nowiki\s*>", re.IGNORECASE | re.DOTALL)
_BR_RE = re.compile(r"<\s*br\b[^>]*>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?\s*[a-zA-Z][a-zA-Z0-9]*\b[^<>]*/?>")
_EXT_LINK_RE = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*\s*([^\]]*)\]", re.IGNORECASE)
_URL_RE = re.compile(r"(?:https?|ftp)://\S+", re.IGNORECASE)
_QUOTES_RE = re.compile(r"'{2,}")
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_RE = re.compile(r"^[*#:;]+\s*")

#: sections that hold references and link lists, not prose
_STOP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "literature", "publications", "works", "discography", "filmography",
    "gallery", "selected works", "selected bibliography", "primary sources", "secondary sources",
    "explanatory notes", "general references", "references and further reading", "links",
    "other reading", "bibliography and further reading",
}


def strip_wiki_markup(wikitext: str) -> str:
    """Plain text of a wikitext page; paragraphs separated by a blank line.

    Templates (nested) are dropped or, for a few prose-carrying inline ones,
    rendered; tables, comments, ``<ref>`` and other non-prose tags, files, images,
    categories and interlanguage links are dropped; ``[[target|label]]`` becomes
    its label and ``[http://url label]`` its label; bold/italic quotes, headings,
    list bullets, HTML tags and entities are removed. Sections such as
    "References" or "External links" are dropped whole. Each list item is its own
    paragraph. A paragraph holding something that cannot be rendered as text (a
    formula) carries ``"\\x00"``; :func:`wiki_paragraphs` filters those out.
    """
    t = _COMMENT_RE.sub("", wikitext)
    t = _NOWIKI_RE.sub(lambda m: m.group(1).replace("[", "(").replace("]", ")")
                       .replace("{", "(").replace("}", ")"), t)
    t = _SELF_CLOSING_RE.sub("", t)
    t = _DROP_TAG_RE.sub("", t)
    t = _SENTINEL_TAG_RE.sub(_SENTINEL, t)
    t = _expand_templates(t)
    t = _expand_links(t)
    t = _EXT_LINK_RE.sub(lambda m: m.group(1), t)
    t = _URL_RE.sub("", t)
    t = _BR_RE.sub(" ", t)
    t = _TAG_RE.sub("", t)
    t = _QUOTES_RE.sub("", t)
    t = _MAGIC_RE.sub("", t)

    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in t.split("\n"):
        line = raw.strip()
        heading = _HEADING_RE.match(line)
        if heading:
            flush()
            title = _QUOTES_RE.sub("", heading.group(2)).strip().lower().rstrip(":")
            skipping = title in _STOP_SECTIONS
            continue
        if skipping:
            continue
        if not line:
            flush()
            continue
        if line.startswith(("|", "!", "----")):  # stray table rows, rules
            flush()
            continue
        bullet = _LIST_RE.match(line)
        if bullet:
            flush()
            item = line[bullet.end():].strip()
            if item:
                paragraphs.append(item)
            continue
        current.append(line)
    flush()
    return "\n\n".join(_clean_paragraph(p) for p in paragraphs if p.strip())


# (applied after whitespace is collapsed to single spaces)
_PUNCT_SPACE_RE = re.compile(r" ([,.;:!?)\]])")
_OPEN_SPACE_RE = re.compile(r"([(\[]) ")
_EMPTY_PARENS_RE = re.compile(r"\( ?(?:[,;:–—-] ?)*\)")
_PAREN_LEAD_RE = re.compile(r"\( ?[,;:] ?")
_PAREN_TAIL_RE = re.compile(r" ?[,;:] ?\)")
_DOUBLE_COMMA_RE = re.compile(r", ?(?=[,.;])")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _clean_paragraph(text: str) -> str:
    t = _squash(html.unescape(text).replace("\u200b", ""))  # split() also takes nbsp, thin space
    for _ in range(2):
        t = _EMPTY_PARENS_RE.sub("", t)
        t = _PAREN_LEAD_RE.sub("(", t)
        t = _PAREN_TAIL_RE.sub(")", t)
        t = _OPEN_SPACE_RE.sub(r"\1", t)
        t = _PUNCT_SPACE_RE.sub(r"\1", t)
        t = _DOUBLE_COMMA_RE.sub("", t)
        t = _squash(t)
    return t


_LEFTOVER_RE = re.compile(
    r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|\||<\s*/?\s*[a-zA-Z!]|/>|==|https?:|www\.|&[a-z]+;|&#\d+;"
)
_SENTENCE_END_RE = re.compile(r"(?:[.!?][\"'”’)\]]*|:)$")
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
_BIBLIO_RE = re.compile(r"\b(?:ISBN|ISSN|OCLC|doi:)", re.IGNORECASE)


def _is_prose(paragraph: str, min_words: int) -> bool:
    if _SENTINEL in paragraph or len(paragraph.split()) < min_words:
        return False
    if _LEFTOVER_RE.search(paragraph) or not _SENTENCE_END_RE.search(paragraph):
        return False
    if _BIBLIO_RE.search(paragraph):  # a bibliography entry outside a "References" section
        return False
    ascii_letters = len(_ASCII_LETTER_RE.findall(paragraph))
    other_letters = sum(1 for c in _NON_ASCII_RE.findall(paragraph) if c.isalpha())
    return ascii_letters > 0 and ascii_letters >= 0.9 * (ascii_letters + other_letters)


def wiki_paragraphs(wikitext: str, min_words: int = DEFAULT_MIN_WORDS) -> list[str]:
    """The prose paragraphs of a wikitext page, in order, as single-line strings.

    A paragraph is kept when it has at least ``min_words`` words, ends a sentence (or
    a colon), carries no leftover markup, unrenderable content or ISBN/DOI (a
    bibliography entry), and is mostly Latin script.
    """
    out = []
    for para in strip_wiki_markup(wikitext).split("\n\n"):
        if _is_prose(para, min_words):
            out.append(para)
    return out


def _budget(docs: Iterator[str], max_words: int | None) -> Iterator[str]:
    """Yield documents until ``max_words`` words; the document that would cross the
    budget is cut at a word boundary, so exactly min(max_words, available) words come out."""
    if max_words is None:
        yield from docs
        return
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 0:
        raise EmbgeomError(f"max_words must be a non-negative integer or None, got {max_words!r}")
    left = max_words
    if left == 0:
        return
    for doc in docs:
        words = doc.split()
        if len(words) >= left:
            yield doc if len(words) == left else " ".join(words[:left])
            return
        left -= len(words)
        yield doc


def wiki_documents(
    max_words: int | None = None,
    *,
    min_words: int = DEFAULT_MIN_WORDS,
    path: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Plain-English paragraphs of gensim's shortened Wikipedia dump, one document each.

    Articles in dump order, paragraphs in page order; deterministic. Words are
    whitespace-separated tokens; with ``max_words`` the stream stops after exactly
    that many words (the last document cut short), or at the end of the sample.
    ``path`` reads another MediaWiki XML dump (``.xml`` or ``.xml.bz2``) instead.
    """
    def paragraphs() -> Iterator[str]:
        for _, text in iter_wiki_articles(path):
            yield from wiki_paragraphs(text, min_words=min_words)

    return _budget(paragraphs(), max_words)


def lee_documents(max_words: int | None = None) -> Iterator[str]:
    """The 300 news stories of gensim's ``lee_background.cor``, one document each, in
    file order (``max_words`` as in :func:`wiki_documents`)."""
    p = lee_path()

    def lines() -> Iterator[str]:
        with open(p, "rb") as fh:
            for raw in fh:
                doc = " ".join(raw.decode("utf-8", errors="replace").split())
                if doc:
                    yield doc

    return _budget(lines(), max_words)


_SOURCES = {"wiki": wiki_documents, "lee": lee_documents}


def write_demo_corpus(
    path: str | os.PathLike, max_words: int | None = None, source: str = "wiki"
) -> Path:
    """Write the demo corpus as a ``.txt`` file, one document per line, and return its path.

    ``source`` is ``"wiki"`` (:func:`wiki_documents`) or ``"lee"``
    (:func:`lee_documents`). Line breaks inside a document become spaces. The file is
    written to a temporary name and renamed, so a partial file never appears.
    """
    if source not in _SOURCES:
        raise EmbgeomError(f"unknown demo corpus source {source!r}; use one of {', '.join(_SOURCES)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = _SOURCES[source](max_words)
    with atomic_writer(out, newline="\n") as fh:
        for doc in docs:
            line = " ".join(doc.split())
            if line:
                fh.write(line + "\n")
    return out
