"""Checks that every fenced code block of a guide is a verbatim piece of the
sources CI builds and runs, so the guide cannot drift from working code.

usage: doc_blocks.py GUIDE.md SOURCE...
Blocks tagged c, python or cmake must each appear in one of the sources,
line for line (indentation aside, so a block may be shown dedented).
"""
import re
import sys


def norm(text):
    return "\n".join(line.strip() for line in text.strip("\n").splitlines())


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    guide = open(argv[1], encoding="utf-8").read()
    sources = {path: norm(open(path, encoding="utf-8").read()) for path in argv[2:]}
    blocks = re.findall(r"^```(c|python|cmake)\n(.*?)^```$", guide, re.M | re.S)
    if not blocks:
        print(f"{argv[1]}: no c/python/cmake blocks found")
        return 1
    missing = 0
    for lang, body in blocks:
        if not any(norm(body) in text for text in sources.values()):
            missing += 1
            first = body.strip().splitlines()[0] if body.strip() else "(empty)"
            print(f"{argv[1]}: {lang} block not found in the sources: {first!r}")
    print(f"{argv[1]}: {len(blocks) - missing} of {len(blocks)} blocks match the sources")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
