"""Counts the lines of C each shape of an async C function takes in the
guide's extension, and checks the table of docs/python.md reports them.

usage: shape_lines.py GUIDE.md GUIDE_EXT.c [--write]
The extension function: its lines from the signature to the closing brace.
Everything it needs: the lines of its section of GUIDE_EXT.c (from its
`/* ---- name(...)` header to the next one), blank lines and comments left
out. --write puts the counts into the table instead of checking them.
"""
import re
import sys

ROWS = [  # (the section, the table row's first cell, the function counted)
    ("resolve", "1. a callback API", "guide_resolve"),
    ("checksum", "2. blocking C work", "guide_checksum"),
    ("double_of", "3. awaiting Python", "guide_double_of"),
    # guide_sleep and guide_local_sleep are one line each around nap().
    ("sleep", "a task of your own", "nap"),
]


def code_lines(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return sum(1 for line in text.splitlines() if line.strip())


def counts(src, name, func):
    section = re.search(r"^/\* ---- %s\(.*?(?=^/\* ---- |\Z)" % re.escape(name), src, re.M | re.S)
    fn = re.search(r"^static PyObject \*%s\(.*?^\}$" % re.escape(func), src, re.M | re.S)
    if not section or not fn:
        raise SystemExit(f"{func} or the section of {name} not found")
    body = section.group(0).split("\n", 1)[1]  # without the header
    return len(fn.group(0).splitlines()), code_lines(body)


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    doc = open(argv[1], encoding="utf-8").read()
    src = open(argv[2], encoding="utf-8").read()
    bad = 0
    for name, row, func in ROWS:
        fn, everything = counts(src, name, func)
        pat = re.compile(r"^(\| %s \|[^|]*\| )(\d+)( \| )(\d+)( \|)$" % re.escape(row), re.M)
        m = pat.search(doc)
        if not m:
            print(f"{argv[1]}: no table row for {row!r}")
            bad += 1
            continue
        if "--write" in argv:
            doc = doc[: m.start()] + f"{m.group(1)}{fn}{m.group(3)}{everything}{m.group(5)}" + doc[m.end():]
        elif (int(m.group(2)), int(m.group(4))) != (fn, everything):
            print(f"{argv[1]}: {name}: the table says {m.group(2)} and {m.group(4)} lines, "
                  f"the source has {fn} and {everything} (run with --write)")
            bad += 1
        print(f"{name}: {fn} lines for the extension function, {everything} in all")
    if "--write" in argv:
        open(argv[1], "w", encoding="utf-8").write(doc)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
