#!/usr/bin/env python3
"""Layout checks (issue 11), run by scripts/test.sh:

* no non-test .rs file under crates/ and apps/ over MAX_LINES lines (tests/ and benches/
  directories and fuzz/ are not checked);
* no import circle between the top-level modules of a crate: file A uses module B when A names
  `crate::b…`, or reaches b through `super::`; `src/b/c.rs` is part of module `b`, and a name the
  crate root re-exports (`pub use b::Name`) counts as module b. Uses inside one module tree do
  not count.
"""
import re
import sys
from pathlib import Path

MAX_LINES = 600
ROOT = Path(__file__).resolve().parent.parent
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """The text without comments, string and char literals (doc links and messages are not
    uses); newlines are kept so line numbers stay right."""
    out, i, n = [], 0, len(text)
    while i < n:
        raw = re.match(r'b?r(#*)"', text[i : i + 20])
        char = re.match(r"b?'(\\.|[^'\\])'", text[i : i + 12])
        if text.startswith("//", i):
            i = text.find("\n", i) % (n + 1)
        elif text.startswith("/*", i):
            end = text.find("*/", i) + 2
            out.append("\n" * text.count("\n", i, end))
            i = end
        elif raw or text.startswith('"', i) or text.startswith('b"', i):
            start = i
            if raw:
                close = '"' + raw.group(1)
                i = text.find(close, i + raw.end()) + len(close)
            else:
                i = text.index('"', i) + 1
                while text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
                i += 1
            out.append('""' + "\n" * text.count("\n", start, i))
        elif char and not re.match(r"\w", text[i - 1 : i]):
            out.append("' '")
            i += char.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def heads(text, start):
    """The first segment of each path in `{a::x, b, c::{d, e}}` starting at text[start] == '{'."""
    depth, item, out = 0, "", []
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                out.append(item)
                break
        if ch == "," and depth == 1:
            out.append(item)
            item = ""
        elif depth >= 1:
            item += ch
    return [m.group(0) for m in (re.match(IDENT, s.strip()) for s in out) if m]


def paths(text, prefix):
    """(line, first segment after the prefix) of every path that starts with `prefix`."""
    for m in re.finditer(r"(?<![\w$])" + prefix, text):
        line = text.count("\n", 0, m.start()) + 1
        rest = m.end()
        if text.startswith("{", rest):
            for head in heads(text, rest):
                yield line, head
        else:
            name = re.match(IDENT, text[rest:])
            if name:
                yield line, name.group(0)


def inline_mods(text):
    """[(start, end, name)] of the inline `mod name { … }` blocks of a file."""
    out = []
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", text):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append((m.start(), i, m.group(1)))
                break
    return out


def module_path(src, path, text, pos):
    """The module path (list of names) of the code at `pos` in file `path`."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts.pop()
    for start, end, name in inline_mods(text):
        if start < pos < end:
            parts.append(name)
    return parts


def check_crate(src, root, errors):
    """Report the import circles between the top-level modules under crate root `root`."""
    root_text = strip(root.read_text())
    mods = set(re.findall(r"^\s*(?:pub(?:\([\w:]+\))?\s+)?mod\s+(" + IDENT + r")\s*;", root_text, re.M))
    reexport = {}  # name the root re-exports -> the top-level module it comes from
    for m in re.finditer(r"^\s*pub(?:\([\w:]+\))?\s+use\s+(?:crate::)?(" + IDENT + r")::([^;]*);", root_text, re.M):
        if m.group(1) in mods:
            for name in re.findall(IDENT, m.group(2)):
                reexport.setdefault(name, m.group(1))
    edges = {}  # (a, b) -> first "file:line"
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src).parts
        top = rel[0].removesuffix(".rs")
        if top not in mods:
            continue
        text = strip(path.read_text())
        uses = list(paths(text, r"crate::"))
        for m in re.finditer(r"(?<![\w$])((?:super::)+)", text):
            here = module_path(src, path, text, m.start())
            up = m.group(1).count("super::")
            if up < len(here):
                continue  # stays inside this module tree (or names an ancestor)
            rest = re.match(r"\{|" + IDENT, text[m.end():])
            if rest and rest.group(0) == "{":
                names = heads(text, m.end())
            else:
                names = [rest.group(0)] if rest else []
            line = text.count("\n", 0, m.start()) + 1
            uses += [(line, n) for n in names]
        for line, name in uses:
            other = name if name in mods else reexport.get(name)
            if other and other != top:
                edges.setdefault((top, other), f"{path.relative_to(ROOT)}:{line}")
    for scc in components(mods, edges):
        members = sorted(scc)
        errors.append(f"import circle in {src.parent.relative_to(ROOT)} between {', '.join(members)}:")
        for (a, b), where in sorted(edges.items()):
            if a in scc and b in scc:
                errors.append(f"    {a} -> {b}  ({where})")


def components(nodes, edges):
    """The strongly connected components with more than one node (Tarjan)."""
    succ = {n: sorted(b for (a, b) in edges if a == n) for n in nodes}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(scc)

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


def main():
    errors, files, crates = [], 0, 0
    for path in sorted(list(ROOT.glob("crates/**/*.rs")) + list(ROOT.glob("apps/**/*.rs"))):
        rel = path.relative_to(ROOT).parts
        if "tests" in rel or "benches" in rel or "target" in rel:
            continue
        files += 1
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            errors.append(f"{path.relative_to(ROOT)}: {lines} lines (over {MAX_LINES})")
    for manifest in sorted(list(ROOT.glob("crates/*/Cargo.toml")) + list(ROOT.glob("apps/*/Cargo.toml"))):
        src = manifest.parent / "src"
        for root in [src / "lib.rs", src / "main.rs"] + sorted(src.glob("bin/*.rs")):
            if root.exists():
                crates += 1
                check_crate(src, root, errors)
    for e in errors:
        print(e)
    if errors:
        sys.exit(1)
    print(f"layout: {files} source files, none over {MAX_LINES} lines; no import circle in {crates} crate roots")


if __name__ == "__main__":
    main()
