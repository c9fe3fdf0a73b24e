"""Wikitext to plain prose: a small purpose-built reader, not a MediaWiki renderer.

Templates are dropped or rendered (embgeom._wikitext_templates); links become their
labels; tables, comments, references, files, categories and the reference sections
are dropped. Paragraphs that still look like markup, hold a formula, are short, do
not end a sentence, or are mostly non-Latin script are skipped, so what comes out is
clean running English with its case and punctuation intact (subword tokenizers need
natural text).
"""
from __future__ import annotations

import html
import re

from ._wikitext_templates import SENTINEL, expand_templates

#: paragraphs with fewer whitespace-separated words than this are skipped
DEFAULT_MIN_WORDS = 20

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
    t = _SENTINEL_TAG_RE.sub(SENTINEL, t)
    t = expand_templates(t)
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
    if SENTINEL in paragraph or len(paragraph.split()) < min_words:
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
