"""Writes native/src/unicode_tables.hpp: the Unicode data the C++ tokenizer needs, taken so that it
splits and normalises text exactly as the ``tokenizers`` library does.

- The character classes of the pre-tokenizers' regexes (\\p{L}, \\p{N}, \\s; GPT-2's ByteLevel
  pattern and Qwen's Split pattern), read from the library's own regex engine (oniguruma, whose
  Unicode version is newer than Python's ``unicodedata``), and the characters that Qwen's
  case-insensitive contractions ``(?i:'s|'t|'re|'ve|'m|'ll|'d)`` accept for each letter (``ſ``
  U+017F matches ``s``), read from the same engine.
- NFC's data (canonical combining classes, full canonical decompositions, primary composites)
  from Python's ``unicodedata``, less what ``tokenizers``' normalizer does not have: it uses the
  Unicode 9.0 tables of the ``unicode-normalization-alignments`` crate, so characters assigned
  after 9.0 have no decomposition and combining class 0 there. The generator probes the library's
  NFD/NFC on every code point and keeps only what it does; the characters left out are listed in
  the header.

    python native/tools/gen_unicode_tables.py > native/src/unicode_tables.hpp
"""

from __future__ import annotations

import sys
import unicodedata

import tokenizers
from tokenizers import Regex, normalizers, pre_tokenizers

PT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
HANGUL = range(0xAC00, 0xD7A4)


def classes(c: int) -> tuple[bool, bool, bool]:
    ch = chr(c)
    letter = len(PT.pre_tokenize_str("a" + ch)) == 1  # ' ?\p{L}+' runs on
    number = len(PT.pre_tokenize_str("1" + ch)) == 1  # ' ?\p{N}+' runs on
    space = len(PT.pre_tokenize_str("\t" + ch + "\t")) == 1  # '\s+' runs on
    return letter, number, space


def ranges(points: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in points:
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def case_insensitive_matches(letter: str) -> list[int]:
    """The code points oniguruma's ``(?i:letter)`` matches, probed over all of Unicode at once."""
    text = "".join(map(chr, CODE_POINTS))
    kept = pre_tokenizers.Split(Regex(f"(?i:{letter})"), "removed").pre_tokenize_str(text)
    covered = bytearray(len(CODE_POINTS))
    for _, (a, b) in kept:
        covered[a:b] = b"\x01" * (b - a)
    return [CODE_POINTS[i] for i, v in enumerate(covered) if not v]


def nfc_data() -> tuple[
    dict[int, int], dict[int, list[int]], dict[tuple[int, int], int], list[int], list[int]
]:
    """(combining classes, full canonical decompositions, primary composites, code points whose
    combining class tokenizers does not have, code points whose decomposition it does not have)."""
    nfd, nfc = normalizers.NFD(), normalizers.NFC()
    ccc: dict[int, int] = {}
    no_ccc: list[int] = []
    for c in CODE_POINTS:
        k = unicodedata.combining(chr(c))
        if not k:
            continue
        # a non-starter in tokenizers' tables: a class above 1 reorders before U+0334 (class 1);
        # class 1 lets 'a' compose with U+0301 across it
        x = chr(c)
        reorders = nfd.normalize_str(x + "\u0334") == "\u0334" + nfd.normalize_str(x)
        composes = nfc.normalize_str("a" + x + "\u0301").startswith("\u00e1")
        if (k > 1 and reorders) or (k == 1 and composes):
            ccc[c] = k
        elif (k > 1 and not reorders and not composes) or (k == 1 and not composes):
            no_ccc.append(c)
        else:
            sys.exit(f"U+{c:04X}: unexpected combining class in tokenizers' normalizer")
    decomp: dict[int, list[int]] = {}
    no_decomp: list[int] = []
    for c in CODE_POINTS:
        if c in HANGUL:
            continue  # algorithmic
        d = unicodedata.normalize("NFD", chr(c))
        if d == chr(c):
            continue
        theirs = nfd.normalize_str(chr(c))
        if theirs == d:
            decomp[c] = [ord(x) for x in d]
        elif theirs == chr(c):
            no_decomp.append(c)
        else:
            sys.exit(f"U+{c:04X}: tokenizers decomposes it otherwise")
    compose: dict[tuple[int, int], int] = {}
    for c in decomp:
        raw = unicodedata.decomposition(chr(c))
        if not raw or raw.startswith("<"):
            continue
        parts = [int(x, 16) for x in raw.split()]
        # a primary composite: a two-character mapping that NFC gives back (not excluded, not a
        # singleton, not a non-starter decomposition)
        if len(parts) == 2 and unicodedata.normalize("NFC", chr(c)) == chr(c):
            if nfc.normalize_str(unicodedata.normalize("NFD", chr(c))) != chr(c):
                sys.exit(f"U+{c:04X}: tokenizers does not compose it")
            compose[(parts[0], parts[1])] = c
    return ccc, decomp, compose, no_ccc, no_decomp


def emit_list(items: list[str], indent: str = "   ") -> None:
    line = indent
    for item in items:
        if len(line) + len(item) + 1 > 110:
            print(line)
            line = indent
        line += " " + item
    if line.strip():
        print(line)


def main() -> None:
    sets: dict[str, list[int]] = {"kLetter": [], "kNumber": [], "kSpace": []}
    for c in CODE_POINTS:
        letter, number, space = classes(c)
        if letter:
            sets["kLetter"].append(c)
        if number:
            sets["kNumber"].append(c)
        if space:
            sets["kSpace"].append(c)
    folds: list[tuple[int, str]] = []
    for letter in "'strevmld":
        folds += [(c, letter) for c in case_insensitive_matches(letter)]
    folds.sort()
    ccc, decomp, compose, no_ccc, no_decomp = nfc_data()

    print("// Generated by native/tools/gen_unicode_tables.py from tokenizers", tokenizers.__version__)
    print(
        f"// (its regex engine's \\p{{L}}, \\p{{N}}, \\s and case folding) and Python {sys.version.split()[0]}'s"
    )
    print(
        f"// unicodedata (Unicode {unicodedata.unidata_version}) for NFC, less what tokenizers' Unicode 9.0"
    )
    print("// normalizer does not have: do not edit.")
    print("// Given no combining class there:")
    emit_list([f"U+{c:04X}" for c in no_ccc] or ["none"], indent="//  ")
    print("// Given no decomposition there:")
    emit_list([f"U+{c:04X}" for c in no_decomp] or ["none"], indent="//  ")
    print("#pragma once\n#include <cstdint>\n\nnamespace omniforge::unicode {\n")
    print("struct Range {\n    uint32_t lo, hi;\n};\n")
    for name, points in sets.items():
        print(f"inline constexpr Range {name}[] = {{")
        emit_list([f"{{0x{lo:X}, 0x{hi:X}}}," for lo, hi in ranges(points)])
        print("};\n")

    print(
        "// (?i:...) of Qwen's contractions: a code point and the ASCII character (' or a lowercase letter) it matches"
    )
    print("struct Fold {\n    uint32_t cp;\n    char letter;\n};\n")
    print("inline constexpr Fold kContractionFold[] = {")
    emit_list([f"{{0x{c:X}, {ord(x)}}}," for c, x in folds])
    print("};\n")

    print("// canonical combining classes (ranges of one class)")
    print("struct ClassRange {\n    uint32_t lo, hi;\n    uint8_t ccc;\n};\n")
    runs: list[list[int]] = []
    for c in sorted(ccc):
        if runs and runs[-1][1] == c - 1 and runs[-1][2] == ccc[c]:
            runs[-1][1] = c
        else:
            runs.append([c, c, ccc[c]])
    print("inline constexpr ClassRange kCombiningClass[] = {")
    emit_list([f"{{0x{a:X}, 0x{b:X}, {k}}}," for a, b, k in runs])
    print("};\n")

    print("// full canonical decompositions (Hangul syllables are algorithmic): kDecomposition[i] is")
    print("// kDecompositionData[offset, offset + length)")
    print("struct Decomposition {\n    uint32_t cp;\n    uint16_t offset;\n    uint8_t length;\n};\n")
    data: list[int] = []
    entries = []
    for c in sorted(decomp):
        entries.append(f"{{0x{c:X}, {len(data)}, {len(decomp[c])}}},")
        data += decomp[c]
    assert len(data) < 1 << 16
    print("inline constexpr Decomposition kDecomposition[] = {")
    emit_list(entries)
    print("};\n")
    print("inline constexpr uint32_t kDecompositionData[] = {")
    emit_list([f"0x{x:X}," for x in data])
    print("};\n")

    print("// primary composites, sorted by (first, second)")
    print("struct Composition {\n    uint32_t first, second, composite;\n};\n")
    print("inline constexpr Composition kComposition[] = {")
    emit_list([f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}," for (a, b), c in sorted(compose.items())])
    print("};\n")
    print("}  // namespace omniforge::unicode")


if __name__ == "__main__":
    main()
