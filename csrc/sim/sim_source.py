"""Turns a CUDA source into C++ for the CUDA simulator (csrc/sim/cuda_sim.h, force-included when compiling):
`kernel<T><<<grid, block, smem, stream>>>(args)` becomes `::pyrag_sim::launch("kernel<T>", __PRETTY_FUNCTION__,
kernel<T>, grid, block, smem, stream)(args)` (named, for the launch statistics), a static `__shared__ T a[n];`
becomes a function static filled with garbage once per block, and `extern __shared__ T name[];` becomes a pointer to the simulated block's dynamic shared
memory (a static pointer, so lambdas see it without a capture, as they see a __shared__ array). Everything else compiles as it is. Usage: python sim_source.py IN.cu OUT.cpp"""

import re
import sys

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


_STATIC_SHARED = re.compile(r"^(?P<indent>[ \t]*)__shared__\s+(?P<decl>[^;]+);", re.MULTILINE)
_DECLARATOR = re.compile(r"^(?P<type>.*?)(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$")


def _split_top_level(decl: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(decl):
        depth += ch in "([<"
        depth -= ch in ")]>"
        if ch == "," and depth == 0:
            parts.append(decl[start:i])
            start = i + 1
    return parts + [decl[start:]]


def _static_shared(m: re.Match) -> str:
    """`__shared__ T a[4], b;` -> `static T a[4], b; shared_garbage(&a, sizeof(a)); ...` on the same line."""
    parts = [p.strip() for p in _split_top_level(m["decl"])]
    first = _DECLARATOR.match(parts[0])
    if first is None or not first["type"].strip():
        raise ValueError(f"unrecognised __shared__ declaration: {m[0]!r}")
    names = [first["name"]]
    for p in parts[1:]:
        d = _DECLARATOR.match(p)
        if d is None or d["type"].strip():
            raise ValueError(f"unrecognised __shared__ declarator {p!r} in {m[0]!r}")
        names.append(d["name"])
    fills = " ".join(f"::pyrag_sim::shared_garbage(&{n}, sizeof({n}));" for n in names)
    return f"{m['indent']}static {m['decl']}; {fills}"


def _kernel_start(src: str, end: int) -> int:
    """Index where the kernel expression that ends at `end` (exclusive) begins: a name with template arguments."""
    i, depth = end, 0
    while i > 0:
        ch = src[i - 1]
        if ch == ">":
            depth += 1
        elif ch == "<":
            depth -= 1
        elif depth == 0 and not (ch.isalnum() or ch in "_:"):
            break
        i -= 1
    return i


def convert(src: str) -> str:
    out, pos = [], 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            break
        line_start = src.rfind("\n", 0, at) + 1
        if "//" in src[line_start:at]:  # inside a comment
            out.append(src[pos : at + 3])
            pos = at + 3
            continue
        close = src.find(">>>", at)
        if close < 0 or src[close + 3 :].lstrip()[:1] != "(":
            raise ValueError(f"unrecognised kernel launch near: {src[at - 40 : at + 40]!r}")
        start = _kernel_start(src, at)
        kernel, cfg = src[start:at].strip(), src[at + 3 : close]
        out.append(src[pos:start])
        out.append(f'::pyrag_sim::launch("{kernel}", __PRETTY_FUNCTION__, {kernel}, {cfg})')
        pos = close + 3
    out.append(src[pos:])
    text = _STATIC_SHARED.sub(_static_shared, "".join(out))
    return _EXTERN_SHARED.sub(lambda m: f"static {m[1]}* {m[2]}; {m[2]} = static_cast<{m[1]}*>(::pyrag_sim::dynamic_smem());", text)


def main() -> None:
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path, encoding="utf-8") as f:
        text = convert(f.read())
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(f'#line 1 "{src_path}"\n')  # diagnostics point at the .cu (the rewrite keeps line numbers)
        f.write(text)


if __name__ == "__main__":
    main()
