"""Checks that every public function of aiobridge states its contract, and
generates the API reference (docs/api.md) from the public headers.

usage: api_contracts.py [--write API.md | --check API.md] [PATH ...]

PATH is a public header or a directory: the include directory (its
aiobridge/*.h) or a directory of headers. Default: the include directory
next to this script's directory.

Every function declared in a public header is public, whatever its export
marker (AIOB_API in the core headers, none in python.h). Each one fails the
check, listed as file:line name: what is missing, when
  - no comment block ends on the line directly above it (declarations on
    consecutive lines share the comment above the first, as a group);
  - its comment names no thread contract: none of THREAD_PHRASES occurs in
    it (the project rule is "loop thread only unless it says Thread-safe",
    and we want that said every time, not inferred);
  - it returns int (a status) and its comment says nothing about the return
    value or errors: none of RETURN_WORDS.

--write renders the reference to API.md; --check compares API.md with what
it would write and prints a unified diff and the command that regenerates
it. Both also run the check, so one CTest test can run both:
  api_contracts.py --check docs/api.md include
Exit status: 0 ok, 1 a check failed, 2 usage.
The output depends only on the headers' text (Python 3.8+, standard library
only).
"""
import argparse
import difflib
import os
import re
import sys
import textwrap

# Phrases that state which thread may call a function, matched without case
# against the comment with its whitespace collapsed (so one may span lines);
# <x> stands for one word, such as `ring`. Each with its meaning, as the
# reference's conventions section shows it.
THREAD_PHRASES = [
    ("Thread-safe", "any thread, concurrently with other calls"),
    ("Any thread", "any thread; the comment says what else it needs"),
    ("Loop thread only", "only on a runtime loop thread, e.g. inside a "
     "backend's `run`"),
    ("Inside the task's poll function",
     "on the task's loop thread, from the task's own poll function"),
    ("On the task's loop thread", "on the loop thread the task runs on"),
    ("Loop thread of its task", "on the loop thread of the task that "
     "armed it"),
    ("Loop thread of <x> only", "only on the loop thread that owns the "
     "object named, such as a ring"),
    ("Host thread only", "only on the host thread of a hosted runtime: "
     "the thread that created it, which runs its host loop"),
    ("With the GIL", "Python bridge: the caller holds the GIL"),
    ("GIL held", "Python bridge: the caller holds the GIL"),
    ("No GIL needed", "Python bridge: callable without the GIL, e.g. from "
     "a C task on a runtime thread"),
    ("Main thread only", "embedding: the program's main thread, from "
     "main(), before Python runs"),
]

# A comment of a function returning int mentions its return value or errors
# with one of these (regular expressions, matched without case).
RETURN_WORDS = [r"\breturns?\b", r"\bAIOB_E[A-Z]+", r"\bnegative\b",
                r"\berrors?\b"]

# Headers in the order the reference shows them; others follow by name.
HEADER_ORDER = ["common.h", "backend.h", "runtime.h", "task.h", "python.h",
                "embed.h", "testing.h"]

C_KEYWORDS = {
    "if", "for", "while", "switch", "return", "sizeof", "void", "int",
    "char", "unsigned", "signed", "long", "short", "const", "volatile",
    "struct", "union", "enum", "typedef", "static", "extern", "inline",
    "double", "float", "_Bool", "__attribute__", "_Atomic",
}

# Words of a return type that say nothing about the type itself.
DECL_NOISE = {"AIOB_API", "extern", "static", "inline", "__inline__",
              "const", "volatile"}

BANNER = re.compile(r"^-{2,}\s*(.*?)\s*-*$")


class Comment:
    def __init__(self, kind, start, end, text, own_line):
        self.kind = kind  # "/*" or "//"
        self.start = start  # first and last line, 1-based
        self.end = end
        self.text = text  # without delimiters and leading " * "
        self.own_line = own_line  # nothing but blanks around it
        self.used = False

    def banner(self):
        first = self.text.split("\n", 1)[0].strip()
        m = BANNER.match(first)
        return m.group(1) if m and first.startswith("--") else None


class Entry:
    """A function, a type or a macro of a header."""

    def __init__(self, kind, names, start, end, ret=None):
        self.kind = kind  # "function", "type" or "macro"
        self.names = names
        self.start = start
        self.end = end
        self.ret = ret  # functions: the return type, normalised
        self.comment = None
        self.group = None


class Header:
    def __init__(self, path, display):
        self.path = path  # as given, for messages
        self.display = display  # aiobridge/<name>.h, for the reference
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        self.lines = self.text.split("\n")
        self.comments = []
        self.entries = []
        self.statement_lines = set()
        self.unparsed = []  # AIOB_API statements that are no function
        self._parse()

    # ---- Lexing: comments, directives, code ------------------------------

    def _parse(self):
        text = self.text
        code = list(text)
        directives = []  # (start line, end line, text without comments)
        line = 1
        i, n = 0, len(text)
        at_line_start = True
        skip_depth = 0  # inside #ifdef __cplusplus: C++ only, not the API
        cond_stack = []

        def blank(a, b):
            for k in range(a, b):
                if code[k] != "\n":
                    code[k] = " "

        while i < n:
            c = text[i]
            if c == "\n":
                line += 1
                at_line_start = True
                i += 1
                continue
            if at_line_start and c == "#":
                j, dline = i, line
                parts = []
                while j < n:
                    k = text.find("\n", j)
                    k = n if k < 0 else k
                    parts.append(text[j:k])
                    if text[j:k].rstrip().endswith("\\") and k < n:
                        j = k + 1
                        line += 1
                        continue
                    j = k
                    break
                raw = "\n".join(parts)
                clean = re.sub(r"/\*.*?\*/", " ", raw, flags=re.S)
                clean = re.sub(r"//.*", "", clean)
                blank(i, j)
                word = re.match(r"#\s*(\w+)", clean)
                word = word.group(1) if word else ""
                if word in ("if", "ifdef", "ifndef"):
                    cpp = re.search(r"__cplusplus", clean) is not None
                    cond_stack.append(cpp and word != "ifndef")
                    if cond_stack[-1]:
                        skip_depth += 1
                elif word in ("else", "elif") and cond_stack:
                    if cond_stack[-1]:
                        cond_stack[-1] = False
                        skip_depth -= 1
                elif word == "endif" and cond_stack:
                    if cond_stack.pop():
                        skip_depth -= 1
                elif skip_depth == 0:
                    directives.append((dline, line, clean))
                i = j
                continue
            if c in " \t\r\f\v":
                i += 1
                continue
            at_line_start = False
            if skip_depth:
                k = text.find("\n", i)
                k = n if k < 0 else k
                blank(i, k)
                i = k
                continue
            if text.startswith("/*", i):
                k = text.find("*/", i + 2)
                k = n if k < 0 else k + 2
                self._add_comment(text, i, k, line, "/*")
                line += text.count("\n", i, k)
                blank(i, k)
                i = k
                continue
            if text.startswith("//", i):
                k = text.find("\n", i)
                k = n if k < 0 else k
                self._add_comment(text, i, k, line, "//")
                blank(i, k)
                i = k
                continue
            if c in "\"'":
                k = i + 1
                while k < n and text[k] != c and text[k] != "\n":
                    k += 2 if text[k] == "\\" else 1
                i = k + 1 if k < n and text[k] == c else k
                continue
            i += 1

        self._merge_line_comments()
        self._statements("".join(code))
        self._macros(directives)
        self.entries.sort(key=lambda e: e.start)
        self._attach()

    def _add_comment(self, text, a, b, line, kind):
        before = text[text.rfind("\n", 0, a) + 1:a]
        after_end = text.find("\n", b)
        after = text[b:after_end if after_end >= 0 else len(text)]
        own = not before.strip() and not after.strip()
        raw = text[a:b]
        end = line + raw.count("\n")
        if kind == "//":
            body = [raw[2:][1:] if raw[2:].startswith(" ") else raw[2:]]
        else:
            body = raw[2:-2].split("\n")
            out = [body[0][1:] if body[0].startswith(" ") else body[0]]
            for ln in body[1:]:
                m = re.match(r"^\s*\*(?!/)( ?)(.*)$", ln)
                out.append(m.group(2) if m else ln.strip())
            body = out
        body = [ln.rstrip() for ln in body]
        while body and not body[-1]:
            body.pop()
        while body and not body[0]:
            body.pop(0)
        self.comments.append(Comment(kind, line, end, "\n".join(body), own))

    def _merge_line_comments(self):
        merged = []
        for c in self.comments:
            prev = merged[-1] if merged else None
            if (prev and c.kind == "//" and prev.kind == "//" and c.own_line
                    and prev.own_line and c.start == prev.end + 1):
                prev.text += "\n" + c.text
                prev.end = c.end
                continue
            merged.append(c)
        self.comments = merged

    # ---- Declarations -----------------------------------------------------

    def _statements(self, code):
        depth = 0
        start = None
        line = 1
        start_line = 0
        for i, c in enumerate(code):
            if c == "\n":
                line += 1
                continue
            if start is None:
                if c.isspace():
                    continue
                start, start_line = i, line
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
                if c == "}" and depth == 0:
                    head = code[start:code.find("{", start)]
                    if _is_function_head(head):
                        self._statement(code[start:i + 1], start_line, line)
                        start = None
            elif c == ";" and depth == 0:
                self._statement(code[start:i + 1], start_line, line)
                start = None

    def _statement(self, stmt, start, end):
        self.statement_lines.update(range(start, end + 1))
        flat = " ".join(stmt.split())
        if re.match(r"(typedef|struct|union|enum)\b", flat) and (
                flat.startswith("typedef") or "{" in flat
                or re.match(r"(struct|union|enum)\s+\w+\s*;$", flat)):
            names = _type_names(flat)
            if names and not all(nm.split()[-1].startswith(("aiob__",
                                                             "AIOB__"))
                                 for nm in names):
                self.entries.append(Entry("type", names, start, end))
            return
        head = flat.split("{", 1)[0] if "{" in flat else flat
        m = _function_name(head)
        if not m:
            if re.search(r"\bAIOB_API\b", flat):
                self.unparsed.append((start, flat[:60]))
            return
        name, ret = m
        self.entries.append(Entry("function", [name], start, end, ret))

    def _macros(self, directives):
        seen = set()
        for start, end, clean in directives:
            m = re.match(r"#\s*define\s+(\w+)", clean)
            if not m:
                continue
            name = m.group(1)
            if (not name.startswith("AIOB_") or name.startswith("AIOB__")
                    or name == "AIOB_API" or name in seen):
                continue
            if start in self.statement_lines:
                continue  # inside a type's body
            seen.add(name)
            self.entries.append(Entry("macro", [name], start, end))

    def _attach(self):
        by_end = {c.end: c for c in self.comments if c.own_line}
        by_last = {}
        for e in self.entries:
            c = by_end.get(e.start - 1)
            prev = by_last.get(e.start - 1)
            if c is not None:
                c.used = True
                if c.banner() is None:
                    e.comment = c
                e.group = e
            elif prev is not None:
                e.comment = prev.comment
                e.group = prev.group
            else:
                e.group = e
            by_last[e.end] = e

    # ---- Queries ----------------------------------------------------------

    def functions(self):
        return [e for e in self.entries if e.kind == "function"]

    def intro(self):
        """The file's leading comment (before any code), or None."""
        first_code = min([e.start for e in self.entries] or [10 ** 9])
        for c in self.comments:
            if c.own_line and c.start < first_code and c.start <= 2:
                return c
        return None


def _is_function_head(head):
    flat = " ".join(head.split())
    if re.match(r"(typedef|struct|union|enum)\b", flat) or "=" in flat:
        return False
    return flat.endswith(")") and _function_name(flat) is not None


def _function_name(flat):
    """(name, return type) of a declaration head, or None."""
    flat = flat.rstrip(";").strip()
    p = flat.find("(")
    if p <= 0 or not flat.endswith(")"):
        return None
    m = re.search(r"([A-Za-z_]\w*)\s*$", flat[:p])
    if not m or m.group(1) in C_KEYWORDS or m.group(1) in DECL_NOISE:
        return None
    ret = flat[:m.start()].split()
    if not ret:
        return None
    ret = " ".join(w for w in ret if w not in DECL_NOISE)
    ret = re.sub(r"\s*\*\s*", " *", ret).strip()
    return m.group(1), ret


def _type_names(flat):
    body = re.search(r"\{(.*)\}", flat)
    tail = flat[body.end():] if body else flat
    lead = flat[:body.start()] if body else flat
    if flat.startswith("typedef"):
        fp = re.search(r"\(\s*\*\s*(\w+)\s*\)", tail)
        if fp:
            return [fp.group(1)]
        m = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*;$", tail)
        return [m.group(1)] if m else []
    m = re.match(r"(struct|union|enum)\s+(\w+)", lead)
    if m:
        return ["%s %s" % (m.group(1), m.group(2))]
    if body and lead.strip() == "enum":  # anonymous: its enumerators
        return re.findall(r"(?:^|,)\s*([A-Za-z_]\w*)", body.group(1))
    return []


# ---- The contract check ---------------------------------------------------


def normalise(text):
    return " ".join(text.lower().split())


def phrase_re(phrase):
    return re.escape(phrase.lower()).replace(re.escape("<x>"), r"\S+")


def problems_of(entry):
    if entry.comment is None:
        return ["no comment block directly above it"]
    out = []
    text = normalise(entry.comment.text)
    if not any(re.search(phrase_re(p), text) for p, _ in THREAD_PHRASES):
        out.append("no thread contract (none of THREAD_PHRASES)")
    if entry.ret == "int" and not any(
            re.search(w, entry.comment.text, re.I) for w in RETURN_WORDS):
        out.append("returns int but its comment says nothing about the "
                   "return value or errors")
    return out


def check(headers):
    failures = 0
    total = 0
    for h in headers:
        for e in h.functions():
            total += 1
            probs = problems_of(e)
            if probs:
                failures += 1
                print("%s:%d %s: %s" % (h.path, e.start, e.names[0],
                                        "; ".join(probs)))
    if total == 0:
        print("api_contracts: no public function found in %s" %
              ", ".join(h.path for h in headers) if headers else
              "api_contracts: no public header found")
        return 1
    for h in headers:
        for line, what in h.unparsed:
            failures += 1
            print("%s:%d: AIOB_API declaration not understood: %s" %
                  (h.path, line, what))
    if any("THREAD_PHRASES" in p for h in headers for e in h.functions()
           for p in problems_of(e)):
        print("THREAD_PHRASES: %s" %
              ", ".join('"%s"' % p for p, _ in THREAD_PHRASES))
    print("api_contracts: %d of %d public functions state their contract" %
          (total - failures, total))
    return 1 if failures else 0


# ---- Markdown -------------------------------------------------------------


def slug(heading, used):
    """The anchor GitHub gives a heading (deduplicated through `used`)."""
    s = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    n = used.get(s, 0)
    used[s] = n + 1
    return s if n == 0 else "%s-%d" % (s, n)


def escape_inline(line):
    """Escapes Markdown emphasis and HTML outside `code spans`."""
    parts = line.split("`")
    if len(parts) % 2 == 0:  # unbalanced: no spans
        parts = [line.replace("`", "\\`")]
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append("`" + part + "`")
            continue
        part = part.replace("\\", "\\\\").replace("*", "\\*")
        part = part.replace("<", "&lt;")
        part = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", part)
        out.append(part)
    s = "".join(out)
    if re.match(r"[#>+=]|-(?!\s)|\d+[.)](\s|$)", s):
        s = "\\" + s if not s[0].isdigit() else re.sub(
            r"^(\d+)([.)])", r"\1\\\2", s)
    return s


def text_to_md(text):
    """Comment text as Markdown: paragraphs, "- " lists and indented code."""
    out = []
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        lines = para.split("\n")
        indents = [len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()]
        if indents and min(indents) >= 2 and \
                not lines[0].lstrip().startswith("- "):
            code = "\n".join(ln[2:] for ln in lines)
            if out and out[-1].startswith("```c\n"):  # one block, gaps kept
                out[-1] = out[-1][:-len("\n```")] + "\n\n" + code + "\n```"
            else:
                out.append("```c\n" + code + "\n```")
            continue
        block = []
        mode = "prose"
        for ln in lines:
            s = ln.strip()
            if s.startswith("- "):
                if mode == "prose" and block:
                    block.append("")
                block.append("- " + escape_inline(s[2:]))
                mode = "list"
            elif mode == "list" and ln.startswith("  "):
                block.append("  " + escape_inline(s))
            else:
                if mode == "list":
                    block.append("")
                block.append(escape_inline(s))
                mode = "prose"
        out.append("\n".join(block))
    return "\n\n".join(out)


def declaration(h, group):
    """The group's declarations as in the header, without AIOB_API (and
    their continuation lines moved left as far)."""
    marker = "AIOB_API "
    out = []
    for e in group:
        lines = h.lines[e.start - 1:e.end]
        if e.kind == "function" and lines[0].startswith(marker):
            lines = [lines[0][len(marker):]] + [
                ln[len(marker):] if ln.startswith(" " * len(marker)) else ln
                for ln in lines[1:]]
        out.extend(lines)
    return "\n".join(out)


def error_table(headers):
    for h in headers:
        m = re.search(r"#define AIOB_ERRNO_MAP\(X\)(.*?)\n\s*\n", h.text,
                      re.S)
        if m:
            rows = re.findall(r'X\((\w+),\s*(\w+),\s*"([^"]*)"\)', m.group(1))
            return ["| `AIOB_%s` | `-%s` | %s |" % (a, b, escape_inline(c))
                    for a, b, c in rows]
    return []


INTRO = """\
# aiobridge API reference

Generated from the public headers by `tests/api_contracts.py`; do not edit.
After changing a header, regenerate it:

    python3 tests/api_contracts.py --write docs/api.md include

The guides explain how the pieces fit: [the C runtime](guide.md),
[C and asyncio awaiting each other](python.md), [backends](backends.md).
Include `<aiobridge.h>` for the C API and `<aiobridge/python.h>` for the
asyncio bridge.

## Conventions

**Return codes.** A function returning `int` returns 0 (or a non-negative
value its comment describes) on success and a negative errno-style code on
failure: `AIOB_<name>` is the negated `<errno.h>` value, so a binding can map
it to the `OSError` subclass Python uses for that errno. `aiob_strerror` and
`aiob_err_name` describe a code. A function returning `aiob_poll` returns
`AIOB_READY` or `AIOB_PENDING` and reports a failure through its status
argument. In the Python bridge, a function returning a `PyObject *` returns
NULL with a Python exception set, and an `int` one returns what its comment
says (-1 with an exception set, or a negative code). If a function that
takes a callback or a task state fails, the callback is never called and
the state stays the caller's.

**Threads.** Every function is loop-thread-only unless its comment says
*Thread-safe*, and every comment states its thread contract with one of
these phrases:

"""

OWNERSHIP = """\

**Ownership.** Every comment says who owns what and until when. A task owns
its state through its `drop`; task handles, wakers and runtime references
are counted references, released by the matching `*_release`; a promise has
a waiter side and a completer side; a task's output value belongs to whoever
takes it, else it is freed with the task. Strings returned by the library
are static unless a comment says otherwise. In the Python bridge, "new
reference" and "borrowed" have their CPython meaning.

**Error codes** (`AIOB_ERRNO_MAP` in `aiobridge/common.h`):

| Code | Value | Message |
| --- | --- | --- |
"""


def render(headers):
    used = {}
    out = [INTRO]
    for phrase, meaning in THREAD_PHRASES:
        out.append("- \"%s\": %s\n" % (phrase, meaning))
    out.append(OWNERSHIP)
    out.append("\n".join(error_table(headers)) + "\n")

    # Anchors are assigned in document order: index first (no headings),
    # then every heading as it is written.
    body = []
    index = []
    slug("aiobridge api reference", used)
    slug("conventions", used)
    slug("index", used)
    for h in headers:
        hslug = slug(h.display, used)
        body.append("\n## `%s`\n" % h.display)
        links = []
        intro = h.intro()
        items = []  # (line, kind, object)
        for c in h.comments:
            if c is intro or not c.own_line or c.start in h.statement_lines:
                continue
            if c.banner() is not None:
                items.append((c.start, "banner", c))
            elif not c.used:
                items.append((c.start, "text", c))
        groups = []
        for e in h.entries:
            if e.group is e:
                groups.append([e])
            else:
                groups[-1].append(e)
        for g in groups:
            items.append((g[0].start, "group", g))
        items.sort(key=lambda it: it[0])
        if intro is not None:
            body.append("\n" + text_to_md(intro.text) + "\n")
        for _, kind, obj in items:
            if kind == "banner":
                lines = obj.text.split("\n", 1)
                body.append("\n### %s\n" % escape_inline(obj.banner()))
                slug(obj.banner(), used)
                if len(lines) > 1 and lines[1].strip():
                    body.append("\n" + text_to_md(lines[1]) + "\n")
            elif kind == "text":
                body.append("\n" + text_to_md(obj.text) + "\n")
            else:
                names = [nm for e in obj for nm in e.names]
                title = ", ".join("`%s`" % nm for nm in names)
                anchor = slug(title.replace("`", ""), used)
                if any(e.kind == "function" for e in obj):
                    for e in obj:
                        if e.kind == "function":
                            links.append("[`%s`](#%s)" % (e.names[0], anchor))
                body.append("\n#### %s\n" % title)
                body.append("\n```c\n%s\n```\n" % declaration(h, obj))
                if obj[0].comment is not None:
                    body.append("\n" + text_to_md(obj[0].comment.text) + "\n")
        index.append(textwrap.fill(
            "[`%s`](#%s): %s" % (h.display, hslug,
                                 ", ".join(links) or "no functions"),
            width=79, initial_indent="- ", subsequent_indent="  ",
            break_long_words=False, break_on_hyphens=False))
    out.append("\n## Index\n\n" + "\n".join(index) + "\n")
    out.extend(body)
    return "".join(out)


# ---- Command line ---------------------------------------------------------


def find_headers(paths):
    found = []
    for p in paths:
        if os.path.isdir(p):
            sub = os.path.join(p, "aiobridge")
            d = sub if os.path.isdir(sub) else p
            for name in os.listdir(d):
                if name.endswith(".h"):
                    found.append(os.path.join(d, name))
        else:
            found.append(p)

    def key(path):
        base = os.path.basename(path)
        rank = HEADER_ORDER.index(base) if base in HEADER_ORDER else \
            len(HEADER_ORDER)
        return (rank, base)

    headers = []
    for path in sorted(set(found), key=key):
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        base = os.path.basename(path)
        display = "aiobridge/" + base if parent == "aiobridge" else base
        headers.append(Header(path, display))
    return headers


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(
        description="Check the public functions' contract comments and "
        "generate or check the API reference.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="API.md",
                      help="write the reference to this file")
    mode.add_argument("--check", metavar="API.md",
                      help="fail if this file differs from the reference")
    ap.add_argument("paths", nargs="*", metavar="PATH",
                    help="public headers or include directories "
                    "(default: %(default)s)",
                    default=[os.path.join(os.path.dirname(here), "include")])
    args = ap.parse_args(argv[1:])
    for p in args.paths:
        if not os.path.exists(p):
            ap.error("no such file or directory: %s" % p)
    headers = find_headers(args.paths)
    rc = check(headers)
    if not headers or not (args.write or args.check):
        return rc
    doc = render(headers)
    if args.write:
        with open(args.write, "w", encoding="utf-8", newline="\n") as f:
            f.write(doc)
        print("api_contracts: wrote %s" % args.write)
        return rc
    try:
        with open(args.check, encoding="utf-8", newline="") as f:
            have = f.read()
    except OSError as e:
        have = ""
        print("api_contracts: cannot read %s: %s" % (args.check, e))
    if have == doc:
        print("api_contracts: %s is up to date" % args.check)
        return rc
    sys.stdout.writelines(difflib.unified_diff(
        have.splitlines(True), doc.splitlines(True),
        fromfile=args.check, tofile="generated from the headers"))
    print("\napi_contracts: %s is out of date; regenerate it with:\n"
          "  python3 %s --write %s %s" % (args.check, argv[0], args.check,
                                          " ".join(args.paths)))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
