"""Source documents -> clean plain text: whitespace normalisation, cutting long documents, and reST conversion.

- `normalize`: `\n` line ends, no tabs or control characters, at most one blank line in a row
- `split_long`: near-equal pieces cut at paragraph (else line) boundaries, so the loader, which starts every row
  at a document and crops what does not fit, loses little of a long document
- `rst_to_text` cleans reStructuredText by light rules: section adornments, table borders, comments, targets and
  index/toctree-like directives go; admonitions become "Note: ..."; code blocks stay, indented by 4 spaces;
  inline roles become plain text or `code`
"""

from __future__ import annotations

import math
import re

MAX_DOC_CHARS = 4_000  # ~1k tokens; see offline_corpus.py for the measured token loss per piece size


def normalize(text: str) -> str:
    """`\\n` line ends, no tabs or control characters, no trailing spaces, at most one blank line in a row,
    exactly one final newline ("" for blank text)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").replace("\x0c", "\n")
    text = re.sub(r"[\x00-\x08\x0b\x0e-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n" if text else ""


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Near-equal pieces of at most max_chars, cut at blank lines (at line ends inside a huge paragraph)."""
    if len(text) <= max_chars:
        return [text]
    units = []
    for para in re.split(r"(?<=\n)\n+", text):
        if len(para) <= max_chars:
            units.append(para)
            continue
        buf = ""
        for line in para.splitlines(keepends=True):
            if buf and len(buf) + len(line) > max_chars:
                units.append(buf)
                buf = ""
            buf += line
        if buf:
            units.append(buf)
    target = len(text) / math.ceil(len(text) / max_chars)
    pieces, buf = [], ""
    for unit in units:
        sep = "\n" if buf else ""
        if buf and (len(buf) + len(sep) + len(unit) > max_chars or len(buf) >= target):
            pieces.append(buf)
            buf, sep = "", ""
        buf += sep + unit
    if buf:
        pieces.append(buf)
    return [normalize(p) for p in pieces if p.strip()]


# ---------------------------------------------------------------------------------------------------------------
# reStructuredText -> lightly cleaned plain text

_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([A-Za-z0-9_:+-]+)::(?:\s+(.*))?$")
_EXPLICIT_RE = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_ADORNMENT_RE = re.compile(r"^\s*([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_SIMPLE_TABLE_RE = re.compile(r"^\s*(=+|-+)(\s+(=+|-+))+\s*$")
_GRID_BORDER_RE = re.compile(r"^\s*\+([-=:]+\+)+\s*$")

_DROP = {
    "index", "toctree", "image", "figure", "include", "literalinclude", "tabularcolumns", "highlight",
    "sectionauthor", "moduleauthor", "module", "currentmodule", "program", "raw", "contents", "testsetup",
    "testcleanup", "audit-event", "audit-event-table", "kernel-doc", "kernel-figure", "kernel-include",
    "kernel-feat", "kernel-abi", "kernel-render", "maintainers-include", "cssclass", "rst-class", "role",
    "default-role", "namespace", "namespace-push", "namespace-pop", "graphviz", "digraph", "graph", "ifconfig",
    "csv-table", "opcode-table", "glossary-index", "autosummary", "automodule", "autoclass", "autofunction",
    "miscellaneous-index", "spelling", "nolinkurl", "limited-api-list", "highlightlang", "sectnum", "footer",
    "header", "meta", "title", "unicode", "date", "replace", "svg", "ditaa", "kfigure", "tab",
}
_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal",
         "productionlist", "math", "literal"}
_ADMONITIONS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "caution": "Caution:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:",
    "error": "Error:", "impl-detail": "CPython implementation detail:", "availability": "Availability:",
    "todo": "Todo:",
}
_OBJECTS = {
    "function", "method", "class", "attribute", "data", "exception", "classmethod", "staticmethod", "decorator",
    "decoratormethod", "coroutinemethod", "coroutinefunction", "abstractmethod", "object", "opcode", "cmdoption",
    "option", "envvar", "pdbcommand", "member", "type", "var", "macro", "struct", "enum", "enumerator", "union",
    "property", "awaitablefunction", "awaitablemethod", "fixer", "2to3fixer", "monitoring-event", "describe",
    "directive", "setting", "confval", "event", "makevar",
}
_UNTITLED = {"only", "class", "container", "hlist", "line-block"}
_CODE_ROLES = {
    "func", "meth", "class", "mod", "attr", "data", "exc", "const", "obj", "type", "member", "macro", "var",
    "expr", "texpr", "envvar", "file", "samp", "program", "option", "command", "keyword", "token", "opcode",
    "makevar", "kbd", "code", "literal", "regexp", "dir", "role", "directive", "struct", "enum", "enumerator",
    "union", "c", "cpp", "py", "monitoring-event", "mailheader", "mimetype", "newsgroup", "cdata", "cfunc",
    "ctype", "cmacro", "cmember", "sysctl", "kconfig", "configurable",
}
_ROLE_RE = re.compile(r":(?:[A-Za-z0-9]+:)?([A-Za-z0-9_+-]+):`((?:[^`\\]|\\.)+?)`")
_LINK_TITLE_RE = re.compile(r"`([^`<>]+?)\s*<[^<>`]*>`_{1,2}")
_LINK_PLAIN_RE = re.compile(r"`([^`<>]+)`_{1,2}")
_BARE_TARGET_RE = re.compile(r"`<([^<>`]+)>`_{1,2}")
_CODE_MARK = "\x00"  # prefixes code lines inside the cleaner so inline-markup cleaning leaves them alone


def _role(m: re.Match) -> str:
    role, text = m.group(1).lower(), m.group(2)
    titled_m = re.match(r"^(.*?)\s*<([^<>]*)>$", text, re.S)
    titled = bool(titled_m and titled_m.group(1).strip())
    if titled:
        text = titled_m.group(1).strip()
    else:
        if titled_m:
            text = titled_m.group(2)
        text = text.lstrip("!")
        if text.startswith("~"):
            text = text[1:].split(".")[-1]
    text = re.sub(r"\\(.)", r"\1", text)
    if role in ("pep", "rfc"):
        return text if titled else f"{role.upper()} {text}"
    if role == "issue":
        return "bpo-" + text
    if role == "gh":
        return "gh-" + text
    if role == "abbr":
        return re.sub(r"\s*\(.*\)\s*$", "", text, flags=re.S)
    if role in _CODE_ROLES and not titled:
        if role in ("func", "meth") and not text.endswith(")"):
            text += "()"
        return f"`{text}`"
    return text


def inline(text: str) -> str:
    """Clean the inline reST markup of one paragraph: roles, ``literals``, `links <url>`_, escapes."""
    if "`" not in text and "\\" not in text:
        return text
    parts = re.split(r"(``.+?``)", text, flags=re.S)
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 1:  # an inline literal
            out.append("`" + part[2:-2] + "`")
            continue
        part = _ROLE_RE.sub(_role, part)
        part = _BARE_TARGET_RE.sub(r"\1", part)
        part = _LINK_TITLE_RE.sub(r"\1", part)
        part = _LINK_PLAIN_RE.sub(r"\1", part)
        part = re.sub(r"(?<!\\)\\ ", "", part)          # escaped space: a zero-width separator
        part = re.sub(r"\\([*_`|\\:<>])", r"\1", part)  # other escapes
        out.append(part)
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    indents = [_indent(line) for line in lines if line.strip()]
    if not indents:
        return []
    m = min(indents)
    return [line[m:] if line.strip() else "" for line in lines]


def _trim(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _code_block(lines: list[str], indent: int = 0) -> list[str]:
    return [_CODE_MARK + " " * (indent + 4) + line if line else "" for line in _trim(_dedent(lines))]


def _clean_lines(lines: list[str]) -> list[str]:
    """Block-level pass: directives, comments, adornments, literal blocks."""
    out = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            out.append("")
            i += 1
            continue
        ind = _indent(line)
        directive = _DIRECTIVE_RE.match(line)
        if directive or _EXPLICIT_RE.match(line):
            j = i + 1
            while j < n and (not lines[j].strip() or _indent(lines[j]) > ind):
                j += 1
            block = lines[i + 1:j]
            body_end = len(block)
            while body_end > 0 and not block[body_end - 1].strip():
                body_end -= 1
            out.extend(_render_explicit(line, directive, block[:body_end]))
            out.extend([""] * (len(block) - body_end))
            i = j
            continue
        if _ADORNMENT_RE.match(line) or _SIMPLE_TABLE_RE.match(line) or _GRID_BORDER_RE.match(line):
            i += 1
            continue
        stripped = line.rstrip()
        if stripped.endswith("::"):  # a paragraph that introduces a literal block: "Example::" -> "Example:"
            if stripped.strip() != "::":
                out.append(stripped[:-3] if stripped.endswith(" ::") else stripped[:-1])
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            k = j
            while k < n and (not lines[k].strip() or _indent(lines[k]) > ind):
                k += 1
            if k > j:
                out.append("")
                out.extend(_code_block(lines[j:k], ind))
                out.append("")
                i = k
            else:
                i += 1
            continue
        out.append(line)
        i += 1
    return out


def _render_explicit(line: str, directive: re.Match | None, block: list[str]) -> list[str]:
    if directive is None:  # comment, hyperlink target, substitution definition, or footnote
        rest = (_EXPLICIT_RE.match(line).group(2) or "").strip()
        footnote = re.match(r"^\[([^\]]+)\]\s*(.*)$", rest)
        if footnote:
            label = footnote.group(1).lstrip("#") or "*"
            return [f"[{label}] {footnote.group(2)}".rstrip()] + _clean_lines(_dedent(block))
        return []
    name = directive.group(2).lower()
    arg = (directive.group(3) or "").strip()
    kind = name.split(":")[-1]  # "c:function" -> "function"
    # the block is: signature continuation lines and :options: (no blank line between), then the body
    head, body = [], []
    for line_ in block:
        if not body and line_.strip():
            head.append(line_)
        else:
            body.append(line_)
    options = [h for h in head if re.match(r"^\s*:[^:`]+:", h)]
    continuation = [h for h in head if h not in options]
    if continuation and kind not in _OBJECTS:
        body, continuation = continuation + body, []
    body = _dedent(body)
    if kind in _DROP or name in _DROP:
        return []
    if kind == "only" and re.search(r"latex|texinfo|epub|man\b", arg):
        return []
    if kind in _CODE:
        formula = ["    " + arg] if kind == "math" and arg else []
        return [""] + formula + _code_block(body) + [""]
    if kind in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
        parts = arg.split(None, 2 if kind == "deprecated-removed" else 1)
        version = parts[0] if parts else ""
        if kind == "deprecated-removed":
            removed = parts[1] if len(parts) > 1 else ""
            extra = parts[2] if len(parts) > 2 else ""
            title = f"Deprecated since version {version}, will be removed in version {removed}"
        else:
            extra = parts[1] if len(parts) > 1 else ""
            title = {"versionadded": "New in version", "versionchanged": "Changed in version",
                     "deprecated": "Deprecated since version"}[kind] + f" {version}"
        text = _clean_lines(body)
        if not extra and text and text[0].strip():
            extra, text = text[0], text[1:]
        return ([f"{title}: {extra}"] if extra else [f"{title}."]) + text
    if kind in _ADMONITIONS:
        label = _ADMONITIONS[kind]
        return [f"{label} {arg}" if arg else label] + _clean_lines(body)
    if kind in _OBJECTS:
        signature = [arg] + [c.strip() for c in continuation]
        if kind in ("decorator", "decoratormethod"):
            signature = ["@" + s for s in signature]
        return [s for s in signature if s] + [""] + _clean_lines(body)
    # titled containers (topic, rubric, table, ...) and unknown directives: the argument as a title, then the body
    text = _clean_lines(body)
    return ([arg, ""] + text) if arg and kind not in _UNTITLED else text


def rst_to_text(source: str) -> str:
    """reStructuredText -> readable plain text (see the module docstring for the rules)."""
    source = source.replace("\r\n", "\n").replace("\t", "        ").replace(_CODE_MARK, "")
    out, paragraph = [], []
    for line in _clean_lines(source.split("\n")) + [""]:
        if line.startswith(_CODE_MARK) or not line.strip():
            if paragraph:  # inline markup may span the lines of one paragraph
                out.append(inline("\n".join(paragraph)))
                paragraph = []
            out.append(line[1:] if line.startswith(_CODE_MARK) else line)
        else:
            paragraph.append(line)
    return normalize("\n".join(out))
