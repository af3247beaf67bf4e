// tokenizer.json in C++: the pieces of the `tokenizers` library that omniforge's tokenizers use,
// ported step by step (added-token splitting, normalizers, pre-tokenizers, BPE with its merge
// queue, post-processor, decoders) so the ids and texts are the library's.
#include "tokenizer.hpp"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>

#include "unicode_tables.hpp"

namespace omniforge {

using json = nlohmann::json;

// ---- UTF-8 ------------------------------------------------------------------------------------

namespace {

// The length of the valid UTF-8 sequence at s[i], or 0 when it is not one.
size_t utf8_seq(const std::string& s, size_t i) {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const size_t n = s.size();
    unsigned char c = b(i);
    if (c < 0x80) return 1;
    auto cont = [&](size_t k) { return k < n && (b(k) & 0xC0) == 0x80; };
    if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (i + 1 >= n) return 0;
        unsigned char c1 = b(i + 1);
        if (c == 0xE0 && c1 < 0xA0) return 0;
        if (c == 0xED && c1 > 0x9F) return 0;  // surrogates
        return cont(i + 1) && cont(i + 2) ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (i + 1 >= n) return 0;
        unsigned char c1 = b(i + 1);
        if (c == 0xF0 && c1 < 0x90) return 0;
        if (c == 0xF4 && c1 > 0x8F) return 0;
        return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
    }
    return 0;
}

uint32_t decode_at(const std::string& s, size_t i, size_t len) {
    const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
    switch (len) {
        case 1: return b(i);
        case 2: return ((b(i) & 0x1F) << 6) | (b(i + 1) & 0x3F);
        case 3: return ((b(i) & 0x0F) << 12) | ((b(i + 1) & 0x3F) << 6) | (b(i + 2) & 0x3F);
        default: return ((b(i) & 0x07) << 18) | ((b(i + 1) & 0x3F) << 12) | ((b(i + 2) & 0x3F) << 6) | (b(i + 3) & 0x3F);
    }
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) out += static_cast<char>(cp);
    else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string from_utf8_lossy(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    const size_t n = s.size();
    while (i < n) {
        size_t len = utf8_seq(s, i);
        if (len) {
            out.append(s, i, len);
            i += len;
            continue;
        }
        // the maximal subpart: a lead byte followed by the continuation bytes it may take
        unsigned char c = static_cast<unsigned char>(s[i]);
        size_t j = i + 1;
        auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
        if (c >= 0xC2 && c <= 0xF4) {
            size_t need = c <= 0xDF ? 1 : c <= 0xEF ? 2 : 3;
            for (size_t k = 0; k < need && j < n; ++k) {
                unsigned char lo = 0x80, hi = 0xBF;
                if (k == 0) {
                    if (c == 0xE0) lo = 0xA0;
                    else if (c == 0xED) hi = 0x9F;
                    else if (c == 0xF0) lo = 0x90;
                    else if (c == 0xF4) hi = 0x8F;
                }
                if (b(j) < lo || b(j) > hi) break;
                ++j;
            }
        }
        out += kReplacement;
        i = j;
    }
    return out;
}

bool in_table(const unicode::Range* table, size_t n, uint32_t cp) {
    const unicode::Range* end = table + n;
    const unicode::Range* it = std::upper_bound(table, end, cp, [](uint32_t v, const unicode::Range& r) { return v < r.lo; });
    return it != table && cp <= (it - 1)->hi;
}

template <size_t N>
bool in(const unicode::Range (&table)[N], uint32_t cp) {
    return in_table(table, N, cp);
}

bool is_letter(uint32_t cp) { return in(unicode::kLetter, cp); }
bool is_number(uint32_t cp) { return in(unicode::kNumber, cp); }
bool is_space(uint32_t cp) { return in(unicode::kSpace, cp); }  // \s, and Rust's char::is_whitespace

// ---- NFC (Unicode's canonical decomposition, ordering and composition) ----

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint8_t combining_class(uint32_t cp) {
    const auto* b = std::begin(unicode::kCombiningClass);
    const auto* e = std::end(unicode::kCombiningClass);
    const auto* it = std::upper_bound(b, e, cp, [](uint32_t v, const unicode::ClassRange& r) { return v < r.lo; });
    return it != b && cp <= (it - 1)->hi ? (it - 1)->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
    if (cp >= kSBase && cp < kSBase + kSCount) {
        const uint32_t s = cp - kSBase;
        out.push_back(kLBase + s / kNCount);
        out.push_back(kVBase + (s % kNCount) / kTCount);
        if (s % kTCount) out.push_back(kTBase + s % kTCount);
        return;
    }
    const auto* b = std::begin(unicode::kDecomposition);
    const auto* e = std::end(unicode::kDecomposition);
    const auto* it = std::lower_bound(b, e, cp, [](const unicode::Decomposition& d, uint32_t v) { return d.cp < v; });
    if (it == e || it->cp != cp) {
        out.push_back(cp);
        return;
    }
    out.insert(out.end(), unicode::kDecompositionData + it->offset, unicode::kDecompositionData + it->offset + it->length);
}

// The primary composite of (a, b), or 0.
uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
        return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
    if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
        return a + (b - kTBase);
    const auto* bgn = std::begin(unicode::kComposition);
    const auto* e = std::end(unicode::kComposition);
    const auto* it = std::lower_bound(bgn, e, std::make_pair(a, b), [](const unicode::Composition& c, const std::pair<uint32_t, uint32_t>& v) {
        return c.first != v.first ? c.first < v.first : c.second < v.second;
    });
    return it != e && it->first == a && it->second == b ? it->composite : 0;
}

struct Chars {  // code points with their byte offsets (offsets.back() == text size)
    std::vector<uint32_t> cps;
    std::vector<size_t> offsets;
    explicit Chars(const std::string& s) {
        for (size_t i = 0; i < s.size();) {
            size_t len = utf8_seq(s, i);
            if (!len) len = 1;  // callers hand valid text
            cps.push_back(decode_at(s, i, len));
            offsets.push_back(i);
            i += len;
        }
        offsets.push_back(s.size());
    }
};

std::string nfc(const std::string& s) {
    bool ascii = true;  // ASCII text is its own NFC
    for (char ch : s) ascii = ascii && static_cast<unsigned char>(ch) < 0x80;
    if (ascii) return s;
    std::vector<uint32_t> d;
    for (uint32_t cp : Chars(s).cps) decompose(cp, d);
    // canonical ordering: each run of non-starters sorted (stably) by combining class
    for (size_t i = 0; i < d.size();) {
        if (!combining_class(d[i])) {
            ++i;
            continue;
        }
        size_t j = i;
        while (j < d.size() && combining_class(d[j])) ++j;
        std::stable_sort(d.begin() + std::ptrdiff_t(i), d.begin() + std::ptrdiff_t(j),
                         [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
        i = j;
    }
    // canonical composition: a character joins the last starter unless blocked
    std::vector<uint32_t> out;
    out.reserve(d.size());
    size_t starter = SIZE_MAX;
    int last_class = -1;  // of the last character kept after the starter; 0: none since it
    for (uint32_t cp : d) {
        const int cls = combining_class(cp);
        if (starter != SIZE_MAX && (last_class == 0 || last_class < cls)) {
            if (uint32_t c = compose_pair(out[starter], cp)) {
                out[starter] = c;
                continue;
            }
        }
        if (cls == 0) {
            starter = out.size();
            last_class = 0;
        } else {
            last_class = cls;
        }
        out.push_back(cp);
    }
    std::string r;
    r.reserve(s.size());
    for (uint32_t cp : out) append_utf8(r, cp);
    return r;
}

}  // namespace

int64_t utf8_length(const std::string& s) {
    int64_t chars = 0;
    for (size_t i = 0; i < s.size(); ++chars) {
        size_t len = utf8_seq(s, i);
        if (!len) return -static_cast<int64_t>(i) - 1;
        i += len;
    }
    return chars;
}

// ---- the parts --------------------------------------------------------------------------------

namespace {

[[noreturn]] void unsupported(const std::string& name, const std::string& what) {
    fail(OF_ERR_UNSUPPORTED, name + " uses " + what + ", which libomniforge's tokenizer does not implement");
}

[[noreturn]] void malformed(const std::string& name, const std::string& what) {
    fail(OF_ERR_MANIFEST, name + " is not a tokenizer libomniforge can read: " + what);
}

struct NormStep {
    // TrimSpaces / CollapseSpaces: the regex Replaces transformers writes for a SentencePiece model
    // that removes extra whitespace ("^ +| +$" -> "", " {2,}" -> " "; oniguruma's ^ and $ match at lines)
    enum Kind { Prepend, Replace, NFC, TrimSpaces, CollapseSpaces } kind;
    std::string a, b;  // Prepend: a; Replace: a -> b
};

const char kTrimSpaces[] = "^ +| +$";
const char kCollapseSpaces[] = " {2,}";

std::string trim_line_spaces(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find('\n', start);
        const bool last = end == std::string::npos;
        if (last) end = text.size();
        size_t a = start, b = end;
        while (a < b && text[a] == ' ') ++a;
        while (b > a && text[b - 1] == ' ') --b;
        out.append(text, a, b - a);
        if (last) break;
        out += '\n';
        start = end + 1;
    }
    return out;
}

std::string collapse_spaces(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] == ' ' && !out.empty() && out.back() == ' ' && i > 0 && text[i - 1] == ' ') continue;
        out += text[i];
    }
    return out;
}

struct PreTok {
    enum Kind { ByteLevel, Metaspace, QwenSplit } kind;
    bool add_prefix_space = false, use_regex = true;             // ByteLevel
    std::string replacement;                                      // Metaspace
    enum Scheme { Always, First, Never } scheme = Always;         // Metaspace
    bool split = true;                                            // Metaspace
};

struct DecStep {
    enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
    std::string a, b;  // Replace: a -> b; Strip: a is the character; Metaspace: a is the replacement
    size_t start = 0, stop = 0;
    bool prepend = true;  // Metaspace: strip the first token's leading space
};

struct Added {
    int32_t id;
    std::string content;
    bool lstrip, rstrip, normalized, special;
};

struct Piece {
    std::string text;
    int32_t token = -1;   // >= 0: an added token, not tokenized further
    bool at_start = false;  // begins at the text's first byte (Metaspace's "first" scheme)
};

// Leftmost-longest matching of a set of strings (the added tokens), as aho-corasick does it.
class Matcher {
  public:
    void add(const std::string& s, size_t index) {
        int node = 0;
        for (unsigned char c : s) {
            auto it = nodes_[size_t(node)].next.find(c);
            if (it == nodes_[size_t(node)].next.end()) {
                nodes_.push_back({});
                int child = static_cast<int>(nodes_.size() - 1);
                nodes_[size_t(node)].next[c] = child;
                node = child;
            } else {
                node = it->second;
            }
        }
        if (nodes_[size_t(node)].index < 0) nodes_[size_t(node)].index = static_cast<int64_t>(index);
    }
    bool empty() const { return nodes_.size() == 1; }
    // The longest pattern starting at text[at]: (pattern index, end) or index -1.
    std::pair<int64_t, size_t> longest_at(const std::string& text, size_t at) const {
        std::pair<int64_t, size_t> best{-1, at};
        int node = 0;
        for (size_t i = at; i < text.size(); ++i) {
            auto it = nodes_[size_t(node)].next.find(static_cast<unsigned char>(text[i]));
            if (it == nodes_[size_t(node)].next.end()) break;
            node = it->second;
            if (nodes_[size_t(node)].index >= 0) best = {nodes_[size_t(node)].index, i + 1};
        }
        return best;
    }

  private:
    struct Node {
        std::map<unsigned char, int> next;
        int64_t index = -1;
    };
    std::vector<Node> nodes_{Node{}};
};

std::string token_string(const json& v, const std::string& name, const char* what) {
    if (!v.is_string()) malformed(name, std::string(what) + " must be a string");
    return v.get<std::string>();
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    std::string out;
    size_t i = 0;
    while (true) {
        size_t at = s.find(from, i);
        if (at == std::string::npos) break;
        out.append(s, i, at - i);
        out += to;
        i = at + from.size();
    }
    out.append(s, i, std::string::npos);
    return out;
}

// The GPT-2 pattern of the byte-level pre-tokenizer, matched as oniguruma matches it:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::pair<size_t, size_t>> gpt2_split(const std::string& s) {
    Chars c(s);
    const size_t n = c.cps.size();
    std::vector<std::pair<size_t, size_t>> out;  // byte ranges
    auto other = [&](uint32_t cp) { return !is_space(cp) && !is_letter(cp) && !is_number(cp); };
    size_t i = 0;
    while (i < n) {
        size_t end = i;  // in chars
        const uint32_t x = c.cps[i];
        if (x == '\'' && i + 1 < n) {
            const uint32_t y = c.cps[i + 1];
            if (y == 's' || y == 't' || y == 'm' || y == 'd') end = i + 2;
            else if (i + 2 < n && ((y == 'r' && c.cps[i + 2] == 'e') || (y == 'v' && c.cps[i + 2] == 'e') || (y == 'l' && c.cps[i + 2] == 'l')))
                end = i + 3;
        }
        if (end == i) {
            for (auto cls : {is_letter, is_number}) {
                size_t j = i;
                if (c.cps[j] == ' ' && j + 1 < n && cls(c.cps[j + 1])) ++j;
                if (cls(c.cps[j])) {
                    while (j < n && cls(c.cps[j])) ++j;
                    end = j;
                    break;
                }
            }
        }
        if (end == i) {
            size_t j = i;
            if (c.cps[j] == ' ' && j + 1 < n && other(c.cps[j + 1])) ++j;
            if (other(c.cps[j])) {
                while (j < n && other(c.cps[j])) ++j;
                end = j;
            }
        }
        if (end == i) {  // whitespace: \s+(?!\S), else \s+
            size_t j = i;
            while (j < n && is_space(c.cps[j])) ++j;
            if (j == n || j - 1 == i) end = j;
            else end = j - 1;
        }
        out.emplace_back(c.offsets[i], c.offsets[end]);
        i = end;
    }
    return out;
}


std::string normalize(const std::vector<NormStep>& steps, std::string text) {
    for (const NormStep& s : steps) {
        if (s.kind == NormStep::Prepend) {
            if (!text.empty()) text = s.a + text;
        } else if (s.kind == NormStep::Replace) {
            text = replace_all(text, s.a, s.b);
        } else if (s.kind == NormStep::TrimSpaces) {
            text = trim_line_spaces(text);
        } else if (s.kind == NormStep::CollapseSpaces) {
            text = collapse_spaces(text);
        } else {
            text = nfc(text);
        }
    }
    return text;
}

// Qwen2's pre-tokenizer pattern (a Split, behaviour Isolated), matched as oniguruma matches it:
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
const char kQwenPattern[] =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

// The ASCII character ('\'' or a lowercase letter) that (?i:x) lets cp stand for, or 0.
char contraction_fold(uint32_t cp) {
    const auto* b = std::begin(unicode::kContractionFold);
    const auto* e = std::end(unicode::kContractionFold);
    const auto* it = std::lower_bound(b, e, cp, [](const unicode::Fold& f, uint32_t v) { return f.cp < v; });
    return it != e && it->cp == cp ? it->letter : 0;
}

std::vector<std::pair<size_t, size_t>> qwen_split(const std::string& s) {
    Chars c(s);
    const size_t n = c.cps.size();
    std::vector<std::pair<size_t, size_t>> out;  // byte ranges
    auto newline = [](uint32_t cp) { return cp == '\r' || cp == '\n'; };
    auto other = [&](uint32_t cp) { return !is_space(cp) && !is_letter(cp) && !is_number(cp); };
    auto fold = [&](size_t k) { return k < n ? contraction_fold(c.cps[k]) : 0; };
    size_t i = 0;
    while (i < n) {
        size_t end = i;  // in chars
        const uint32_t x = c.cps[i];
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if (fold(i) == '\'') {
            const char y = fold(i + 1), z = fold(i + 2);
            if (y == 's' || y == 't' || y == 'm' || y == 'd') end = i + 2;
            else if ((y == 'r' && z == 'e') || (y == 'v' && z == 'e') || (y == 'l' && z == 'l')) end = i + 3;
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if (end == i) {
            size_t j = i;
            if (!newline(x) && !is_letter(x) && !is_number(x) && j + 1 < n && is_letter(c.cps[j + 1])) ++j;
            if (is_letter(c.cps[j])) {
                while (j < n && is_letter(c.cps[j])) ++j;
                end = j;
            }
        }
        // \p{N}
        if (end == i && is_number(x)) end = i + 1;
        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        if (end == i) {
            size_t j = i;
            if (x == ' ' && j + 1 < n && other(c.cps[j + 1])) ++j;
            if (other(c.cps[j])) {
                while (j < n && other(c.cps[j])) ++j;
                while (j < n && newline(c.cps[j])) ++j;
                end = j;
            }
        }
        if (end == i && is_space(x)) {
            size_t j = i;  // the whitespace run
            while (j < n && is_space(c.cps[j])) ++j;
            size_t last_newline = SIZE_MAX;
            for (size_t k = i; k < j; ++k)
                if (newline(c.cps[k])) last_newline = k;
            if (last_newline != SIZE_MAX) end = last_newline + 1;  // \s*[\r\n]+
            else if (j == n || j - 1 == i) end = j;                  // \s+(?!\S), else \s+
            else end = j - 1;
        }
        if (end == i) end = i + 1;  // no alternative matches (cannot happen: every character is one of the classes)
        out.emplace_back(c.offsets[i], c.offsets[end]);
        i = end;
    }
    return out;
}

const std::vector<std::string>& byte_chars() {  // GPT-2's bytes_to_unicode, as UTF-8 strings
    static const std::vector<std::string> table = [] {
        std::vector<std::string> t(256);
        uint32_t extra = 0;
        for (uint32_t b = 0; b < 256; ++b) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            append_utf8(t[b], printable ? b : 256 + extra++);
        }
        return t;
    }();
    return table;
}

const std::unordered_map<uint32_t, unsigned char>& char_bytes() {
    static const std::unordered_map<uint32_t, unsigned char> table = [] {
        std::unordered_map<uint32_t, unsigned char> t;
        uint32_t extra = 0;
        for (uint32_t b = 0; b < 256; ++b) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            t[printable ? b : 256 + extra++] = static_cast<unsigned char>(b);
        }
        return t;
    }();
    return table;
}

}  // namespace

// ---- the tokenizer ------------------------------------------------------------------------------

struct Tokenizer::Impl {
    std::string name;
    // model: BPE
    std::unordered_map<std::string, int32_t> vocab;
    std::unordered_map<int32_t, std::string> vocab_r;
    std::unordered_map<uint64_t, std::pair<uint32_t, int32_t>> merges;  // (left, right) -> (rank, new id)
    std::optional<int32_t> unk;
    bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
    // added tokens
    std::vector<Added> added;
    std::unordered_map<std::string, size_t> added_by_content;
    std::unordered_map<int32_t, size_t> added_by_id;
    Matcher raw_matcher, normalized_matcher;
    std::vector<size_t> raw_index, normalized_index;  // matcher pattern -> added index
    // pipeline
    std::vector<NormStep> normalizer;
    std::vector<PreTok> pre;
    bool has_decoder = false;
    std::vector<DecStep> decoder;
    std::vector<std::pair<bool, int32_t>> template_single;  // (is $A, special id) ; empty: none
    std::vector<std::vector<int32_t>> template_ids;
    size_t max_chars = 1;

    void bpe(const std::string& word, std::vector<int32_t>& out) const;
    std::vector<Piece> split_added(const std::vector<Piece>& in, const Matcher& m, const std::vector<size_t>& index) const;
};

namespace {

void parse_normalizer(const json& n, Tokenizer::Impl& t) {
    if (n.is_null()) return;
    if (!n.is_object() || !n.contains("type")) malformed(t.name, "a normalizer has no type");
    const std::string type = token_string(n["type"], t.name, "a normalizer's type");
    if (type == "Sequence") {
        for (const json& s : n.value("normalizers", json::array())) parse_normalizer(s, t);
    } else if (type == "NFC") {
        t.normalizer.push_back({NormStep::NFC, "", ""});
    } else if (type == "Prepend") {
        t.normalizer.push_back({NormStep::Prepend, token_string(n.value("prepend", json()), t.name, "Prepend's prepend"), ""});
    } else if (type == "Replace") {
        const json& pat = n.value("pattern", json());
        const std::string content = token_string(n.value("content", json()), t.name, "Replace's content");
        if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
            const std::string re = pat["Regex"].get<std::string>();
            if (re == kTrimSpaces && content.empty()) {
                t.normalizer.push_back({NormStep::TrimSpaces, "", ""});
            } else if (re == kCollapseSpaces && content == " ") {
                t.normalizer.push_back({NormStep::CollapseSpaces, "", ""});
            } else {
                unsupported(t.name, "a Replace normalizer with a regex pattern other than SentencePiece's whitespace rules");
            }
            return;
        }
        if (!pat.is_object() || !pat.contains("String")) unsupported(t.name, "a Replace normalizer without a pattern");
        t.normalizer.push_back({NormStep::Replace, token_string(pat["String"], t.name, "Replace's pattern"), content});
    } else {
        unsupported(t.name, "the normalizer '" + type + "'");
    }
}

void parse_pre_tokenizer(const json& p, Tokenizer::Impl& t) {
    if (p.is_null()) return;
    if (!p.is_object() || !p.contains("type")) malformed(t.name, "a pre-tokenizer has no type");
    const std::string type = token_string(p["type"], t.name, "a pre-tokenizer's type");
    PreTok pt{};
    if (type == "Sequence") {
        for (const json& s : p.value("pretokenizers", json::array())) parse_pre_tokenizer(s, t);
        return;
    } else if (type == "ByteLevel") {
        pt.kind = PreTok::ByteLevel;
        pt.add_prefix_space = p.value("add_prefix_space", false);
        pt.use_regex = p.value("use_regex", true);
    } else if (type == "Split") {
        const json& pat = p.value("pattern", json());
        const std::string behavior = p.value("behavior", std::string());
        if (!pat.is_object() || !pat.contains("Regex") || !pat["Regex"].is_string() || pat["Regex"].get<std::string>() != kQwenPattern)
            unsupported(t.name, "a Split pre-tokenizer whose pattern is not Qwen2's regex (other patterns are not matched)");
        if (behavior != "Isolated" || p.value("invert", false))
            unsupported(t.name, "a Split pre-tokenizer with behavior '" + behavior + "'" + (p.value("invert", false) ? " inverted" : "") +
                                    " (only Isolated, not inverted, is read)");
        pt.kind = PreTok::QwenSplit;
    } else if (type == "Metaspace") {
        pt.kind = PreTok::Metaspace;
        pt.replacement = token_string(p.value("replacement", json("\xE2\x96\x81")), t.name, "Metaspace's replacement");
        if (utf8_length(pt.replacement) != 1) malformed(t.name, "Metaspace's replacement must be one character");
        std::string scheme = p.contains("prepend_scheme") ? token_string(p["prepend_scheme"], t.name, "Metaspace's prepend_scheme")
                                                          : (p.value("add_prefix_space", true) ? "always" : "never");
        if (scheme == "always") pt.scheme = PreTok::Always;
        else if (scheme == "first") pt.scheme = PreTok::First;
        else if (scheme == "never") pt.scheme = PreTok::Never;
        else malformed(t.name, "Metaspace's prepend_scheme '" + scheme + "' is unknown");
        pt.split = p.value("split", true);
    } else {
        unsupported(t.name, "the pre-tokenizer '" + type + "'");
    }
    t.pre.push_back(pt);
}

void parse_decoder(const json& d, Tokenizer::Impl& t) {
    if (d.is_null()) return;
    if (!d.is_object() || !d.contains("type")) malformed(t.name, "a decoder has no type");
    t.has_decoder = true;
    const std::string type = token_string(d["type"], t.name, "a decoder's type");
    DecStep s{};
    if (type == "Sequence") {
        for (const json& x : d.value("decoders", json::array())) parse_decoder(x, t);
        return;
    } else if (type == "ByteLevel") {
        s.kind = DecStep::ByteLevel;
    } else if (type == "Replace") {
        const json& pat = d.value("pattern", json());
        if (!pat.is_object() || !pat.contains("String")) unsupported(t.name, "a Replace decoder with a regex pattern");
        s.kind = DecStep::Replace;
        s.a = token_string(pat["String"], t.name, "Replace's pattern");
        s.b = token_string(d.value("content", json()), t.name, "Replace's content");
    } else if (type == "ByteFallback") {
        s.kind = DecStep::ByteFallback;
    } else if (type == "Fuse") {
        s.kind = DecStep::Fuse;
    } else if (type == "Strip") {
        s.kind = DecStep::Strip;
        s.a = token_string(d.value("content", json(" ")), t.name, "Strip's content");
        if (utf8_length(s.a) != 1) malformed(t.name, "Strip's content must be one character");
        s.start = d.value("start", size_t(0));
        s.stop = d.value("stop", size_t(0));
    } else if (type == "Metaspace") {
        s.kind = DecStep::Metaspace;
        s.a = token_string(d.value("replacement", json("\xE2\x96\x81")), t.name, "Metaspace's replacement");
        std::string scheme = d.contains("prepend_scheme") ? d["prepend_scheme"].get<std::string>()
                                                          : (d.value("add_prefix_space", true) ? "always" : "never");
        s.prepend = scheme != "never";
    } else {
        unsupported(t.name, "the decoder '" + type + "'");
    }
    t.decoder.push_back(s);
}

void parse_post_processor(const json& p, Tokenizer::Impl& t) {
    if (p.is_null()) return;
    if (!p.is_object() || !p.contains("type")) malformed(t.name, "a post-processor has no type");
    const std::string type = token_string(p["type"], t.name, "a post-processor's type");
    if (type == "Sequence") {
        for (const json& x : p.value("processors", json::array())) parse_post_processor(x, t);
    } else if (type == "ByteLevel") {
        // offsets only: the ids are unchanged
    } else if (type == "TemplateProcessing") {
        if (!t.template_single.empty()) unsupported(t.name, "two template post-processors");
        const json& single = p.value("single", json());
        const json& specials = p.value("special_tokens", json::object());
        if (!single.is_array()) malformed(t.name, "TemplateProcessing's single template must be a list");
        bool has_a = false;
        for (const json& item : single) {
            if (item.contains("Sequence")) {
                if (item["Sequence"].value("id", std::string()) != "A") unsupported(t.name, "a single-sequence template naming sequence B");
                t.template_single.push_back({true, -1});
                has_a = true;
            } else if (item.contains("SpecialToken")) {
                const std::string key = item["SpecialToken"].value("id", std::string());
                if (!specials.contains(key) || !specials[key].contains("ids")) malformed(t.name, "the template's special token '" + key + "' is not defined");
                t.template_ids.push_back(specials[key]["ids"].get<std::vector<int32_t>>());
                t.template_single.push_back({false, static_cast<int32_t>(t.template_ids.size() - 1)});
            } else {
                malformed(t.name, "a template piece is neither a sequence nor a special token");
            }
        }
        if (!has_a) malformed(t.name, "TemplateProcessing's single template holds no $A");
    } else {
        unsupported(t.name, "the post-processor '" + type + "'");
    }
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_json(const std::string& text, const std::string& name) {
    auto t = std::make_unique<Impl>();
    t->name = name;
    json d = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (d.is_discarded() || !d.is_object()) malformed(name, "it is not a JSON object");
    try {
        if (d.contains("truncation") && !d["truncation"].is_null()) unsupported(name, "truncation");
        if (d.contains("padding") && !d["padding"].is_null()) unsupported(name, "padding");
        const json& model = d.value("model", json());
        if (!model.is_object()) malformed(name, "it has no model");
        const std::string type = model.value("type", std::string("BPE"));
        if (type != "BPE") unsupported(name, "a " + type + " model (only BPE models are read)");
        if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
            unsupported(name, "BPE dropout");
        for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
            if (model.contains(k) && !model[k].is_null() && !model[k].get<std::string>().empty())
                unsupported(name, std::string("a BPE ") + k);
        t->fuse_unk = model.value("fuse_unk", false);
        t->byte_fallback = model.value("byte_fallback", false);
        t->ignore_merges = model.value("ignore_merges", false);
        const json& vocab = model.value("vocab", json());
        if (!vocab.is_object()) malformed(name, "the model's vocab is not an object");
        for (auto& [tok, id] : vocab.items()) {
            if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
                malformed(name, "the vocab's ids must be integers in [0, 2^31)");
            const int32_t i = id.get<int32_t>();
            t->vocab[tok] = i;
            t->vocab_r[i] = tok;
        }
        if (model.contains("unk_token") && !model["unk_token"].is_null()) {
            const std::string u = token_string(model["unk_token"], name, "unk_token");
            auto it = t->vocab.find(u);
            if (it == t->vocab.end()) malformed(name, "its unk_token is not in the vocab");
            t->unk = it->second;
        }
        const json& merges = model.value("merges", json::array());
        if (!merges.is_array()) malformed(name, "the model's merges are not a list");
        uint32_t rank = 0;
        for (const json& m : merges) {
            std::string a, b;
            if (m.is_string()) {
                const std::string s = m.get<std::string>();
                size_t sp = s.find(' ');
                if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) malformed(name, "a merge is not two tokens");
                a = s.substr(0, sp);
                b = s.substr(sp + 1);
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                a = m[0].get<std::string>();
                b = m[1].get<std::string>();
            } else {
                malformed(name, "a merge is not two tokens");
            }
            auto ia = t->vocab.find(a), ib = t->vocab.find(b), ic = t->vocab.find(a + b);
            if (ia == t->vocab.end() || ib == t->vocab.end() || ic == t->vocab.end())
                malformed(name, "a merge names a token that is not in the vocab");
            const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
            t->merges.emplace(key, std::make_pair(rank++, ic->second));
        }

        const json& added = d.value("added_tokens", json::array());
        if (!added.is_array()) malformed(name, "added_tokens is not a list");
        for (const json& a : added) {
            Added x{};
            if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer()) malformed(name, "an added token has no id");
            x.id = a["id"].get<int32_t>();
            x.content = token_string(a.value("content", json()), name, "an added token's content");
            if (x.content.empty()) malformed(name, "an added token is empty");
            if (a.value("single_word", false)) unsupported(name, "single_word added tokens");
            x.lstrip = a.value("lstrip", false);
            x.rstrip = a.value("rstrip", false);
            x.normalized = a.value("normalized", false);
            x.special = a.value("special", false);
            if (t->added_by_content.count(x.content)) continue;
            t->added_by_content[x.content] = t->added.size();
            t->added_by_id[x.id] = t->added.size();
            t->added.push_back(x);
        }
        parse_normalizer(d.value("normalizer", json()), *t);
        parse_pre_tokenizer(d.value("pre_tokenizer", json()), *t);
        parse_post_processor(d.value("post_processor", json()), *t);
        parse_decoder(d.value("decoder", json()), *t);
    } catch (const json::exception& e) {
        malformed(name, std::string("a field has the wrong type (") + e.what() + ")");
    }
    // the splitting tries: non-normalized tokens on the raw text, normalized ones after normalizing
    for (size_t i = 0; i < t->added.size(); ++i) {
        Added& a = t->added[i];
        if (a.normalized) {
            const std::string n = normalize(t->normalizer, a.content);  // matched in normalized text: its normalized form
            t->normalized_matcher.add(n, t->normalized_index.size());
            t->normalized_index.push_back(i);
        } else {
            t->raw_matcher.add(a.content, t->raw_index.size());
            t->raw_index.push_back(i);
        }
    }
    for (const auto& [tok, id] : t->vocab) t->max_chars = std::max<size_t>(t->max_chars, size_t(std::max<int64_t>(1, utf8_length(tok))));
    for (const Added& a : t->added) t->max_chars = std::max<size_t>(t->max_chars, size_t(std::max<int64_t>(1, utf8_length(a.content))));
    return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(t)));
}

// AddedVocabulary::split_with_indices on each piece not already a token.
std::vector<Piece> Tokenizer::Impl::split_added(const std::vector<Piece>& in, const Matcher& m, const std::vector<size_t>& index) const {
    std::vector<Piece> out;
    for (const Piece& p : in) {
        if (p.token >= 0 || m.empty()) {
            if (p.token >= 0 || !p.text.empty()) out.push_back(p);
            continue;
        }
        const std::string& s = p.text;
        size_t start_offset = 0, pos = 0;
        auto push_text = [&](size_t a, size_t b) {
            if (b > a) out.push_back({s.substr(a, b - a), -1, p.at_start && a == 0});
        };
        while (pos < s.size()) {
            auto [pattern, end] = m.longest_at(s, pos);
            if (pattern < 0) {
                ++pos;
                continue;
            }
            const Added& a = added[index[size_t(pattern)]];
            size_t start = pos, stop = end;
            if (a.lstrip) {  // the whitespace before it (not already taken by the previous match)
                Chars c(s.substr(0, start));
                size_t k = c.cps.size();
                while (k > 0 && is_space(c.cps[k - 1])) --k;
                start = std::max(c.offsets[k], start_offset);
            }
            if (a.rstrip) {
                Chars c(s.substr(stop));
                size_t k = 0;
                while (k < c.cps.size() && is_space(c.cps[k])) ++k;
                stop += c.offsets[k];
            }
            push_text(start_offset, start);
            out.push_back({s.substr(start, stop - start), a.id, false});
            start_offset = stop;
            pos = end;  // the matcher goes on after the match itself
        }
        push_text(start_offset, s.size());
    }
    return out;
}

void Tokenizer::Impl::bpe(const std::string& w, std::vector<int32_t>& out) const {
    if (w.empty()) return;
    if (ignore_merges) {
        auto it = vocab.find(w);
        if (it != vocab.end()) {
            out.push_back(it->second);
            return;
        }
    }
    struct Symbol {
        int32_t c;
        int64_t prev, next;
        size_t len;
    };
    std::vector<Symbol> symbols;
    bool has_unk = false;  // an unknown run waiting to be added (fused when fuse_unk)
    int32_t unk_id = 0;
    size_t unk_len = 0;
    auto add = [&](int32_t id, size_t len) {
        const int64_t i = static_cast<int64_t>(symbols.size());
        symbols.push_back({id, i - 1, i + 1, len});
    };
    for (size_t i = 0; i < w.size();) {
        size_t len = utf8_seq(w, i);
        if (!len) len = 1;
        const std::string ch = w.substr(i, len);
        i += len;
        auto it = vocab.find(ch);
        if (it != vocab.end()) {
            if (has_unk) {
                add(unk_id, unk_len);
                has_unk = false;
            }
            add(it->second, len);
            continue;
        }
        if (byte_fallback) {
            std::vector<int32_t> bytes;
            for (unsigned char b : ch) {
                char code[8];
                std::snprintf(code, sizeof code, "<0x%02X>", b);
                auto bt = vocab.find(code);
                if (bt == vocab.end()) break;
                bytes.push_back(bt->second);
            }
            if (bytes.size() == ch.size()) {
                for (int32_t b : bytes) add(b, 1);  // (a pending unk stays pending, as in tokenizers)
                continue;
            }
        }
        if (unk) {
            if (has_unk && fuse_unk) unk_len += len;
            else {
                if (has_unk) add(unk_id, unk_len);
                has_unk = true;
                unk_id = *unk;
                unk_len = len;
            }
        }
    }
    if (has_unk) add(unk_id, unk_len);
    if (!symbols.empty()) symbols.back().next = -1;

    // Word::merge_all: lowest rank first, then leftmost; stale entries skipped
    struct Merge {
        size_t pos;
        uint32_t rank;
        int32_t new_id;
        bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    auto find = [&](int32_t a, int32_t b) -> const std::pair<uint32_t, int32_t>* {
        auto it = merges.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
        return it == merges.end() ? nullptr : &it->second;
    };
    std::priority_queue<Merge> queue;
    for (size_t i = 0; i + 1 < symbols.size(); ++i)
        if (auto m = find(symbols[i].c, symbols[i + 1].c)) queue.push({i, m->first, m->second});
    while (!queue.empty()) {
        Merge top = queue.top();
        queue.pop();
        Symbol& cur = symbols[top.pos];
        if (cur.len == 0 || cur.next == -1) continue;
        const size_t next_pos = size_t(cur.next);
        const Symbol right = symbols[next_pos];
        auto m = find(cur.c, right.c);
        if (!m || m->second != top.new_id) continue;
        cur.c = top.new_id;
        cur.len += right.len;
        cur.next = right.next;
        symbols[next_pos].len = 0;
        if (right.next > -1 && size_t(right.next) < symbols.size()) symbols[size_t(right.next)].prev = int64_t(top.pos);
        if (cur.prev >= 0) {
            if (auto pm = find(symbols[size_t(cur.prev)].c, cur.c)) queue.push({size_t(cur.prev), pm->first, pm->second});
        }
        if (cur.next >= 0 && size_t(cur.next) < symbols.size()) {
            if (auto nm = find(cur.c, symbols[size_t(cur.next)].c)) queue.push({top.pos, nm->first, nm->second});
        }
    }
    for (const Symbol& s : symbols)
        if (s.len) out.push_back(s.c);
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
    const Impl& t = *impl_;
    const int64_t chars = utf8_length(text);
    if (chars < 0)
        fail(OF_ERR_INPUT, "the text is not valid UTF-8 (byte " + std::to_string(-chars - 1) + " starts an invalid sequence)");
    std::vector<Piece> pieces{{text, -1, true}};
    pieces = t.split_added(pieces, t.raw_matcher, t.raw_index);
    for (Piece& p : pieces) {
        if (p.token >= 0) continue;
        p.text = normalize(t.normalizer, std::move(p.text));
    }
    pieces = t.split_added(pieces, t.normalized_matcher, t.normalized_index);
    for (const PreTok& pt : t.pre) {
        std::vector<Piece> next;
        for (Piece& p : pieces) {
            if (p.token >= 0) {
                next.push_back(std::move(p));
                continue;
            }
            if (pt.kind == PreTok::QwenSplit) {
                for (auto [a, b] : qwen_split(p.text)) next.push_back({p.text.substr(a, b - a), -1, p.at_start && a == 0});
            } else if (pt.kind == PreTok::ByteLevel) {
                std::string s = p.text;
                if (pt.add_prefix_space && (s.empty() || s[0] != ' ')) s = " " + s;
                std::vector<std::pair<size_t, size_t>> parts;
                if (pt.use_regex) parts = gpt2_split(s);
                else parts.emplace_back(0, s.size());
                const auto& bc = byte_chars();
                for (auto [a, b] : parts) {
                    std::string mapped;
                    for (size_t k = a; k < b; ++k) mapped += bc[static_cast<unsigned char>(s[k])];
                    if (!mapped.empty()) next.push_back({mapped, -1, p.at_start && a == 0});
                }
            } else {  // Metaspace
                std::string s = replace_all(p.text, " ", pt.replacement);
                const bool starts = s.compare(0, pt.replacement.size(), pt.replacement) == 0;
                if (!starts && (pt.scheme == PreTok::Always || (pt.scheme == PreTok::First && p.at_start))) s = pt.replacement + s;
                if (!pt.split) {
                    if (!s.empty()) next.push_back({s, -1, p.at_start});
                    continue;
                }
                size_t start = 0;  // MergedWithNext: each replacement begins a piece
                for (size_t at = s.find(pt.replacement, 1); at != std::string::npos; at = s.find(pt.replacement, at + 1)) {
                    if (at > start) next.push_back({s.substr(start, at - start), -1, p.at_start && start == 0});
                    start = at;
                }
                if (start < s.size()) next.push_back({s.substr(start), -1, p.at_start && start == 0});
            }
        }
        pieces = std::move(next);
    }
    std::vector<int32_t> ids;
    for (const Piece& p : pieces) {
        if (p.token >= 0) ids.push_back(p.token);
        else t.bpe(p.text, ids);
    }
    if (!add_special_tokens || t.template_single.empty()) return ids;
    std::vector<int32_t> out;
    for (auto [is_a, which] : t.template_single) {
        if (is_a) out.insert(out.end(), ids.begin(), ids.end());
        else out.insert(out.end(), t.template_ids[size_t(which)].begin(), t.template_ids[size_t(which)].end());
    }
    return out;
}

std::optional<int32_t> Tokenizer::token_to_id(const std::string& token) const {
    if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return impl_->added[it->second].id;
    if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
    return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
    if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) return impl_->added[it->second].content;
    if (auto it = impl_->vocab_r.find(id); it != impl_->vocab_r.end()) return it->second;
    return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
    auto it = impl_->added_by_id.find(id);
    return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

size_t Tokenizer::vocab_size() const {
    size_t n = impl_->vocab.size();
    for (const Added& a : impl_->added)
        if (!impl_->vocab_r.count(a.id)) ++n;
    return n;
}

size_t Tokenizer::max_token_chars() const { return impl_->max_chars; }

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
    const Impl& t = *impl_;
    std::vector<std::string> tokens;
    for (int32_t id : ids) {
        std::optional<std::string> tok = id_to_token(id);
        if (!tok) continue;
        if (skip_special_tokens) {  // special by content, as tokenizers checks it
            auto it = t.added_by_content.find(*tok);
            if (it != t.added_by_content.end() && t.added[it->second].special) continue;
        }
        tokens.push_back(std::move(*tok));
    }
    if (!t.has_decoder) {
        std::string out;
        for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
        return out;
    }
    for (const DecStep& s : t.decoder) {
        switch (s.kind) {
            case DecStep::ByteLevel: {
                const auto& cb = char_bytes();
                std::string bytes;
                for (const std::string& tok : tokens) {
                    Chars c(tok);
                    std::string mine;
                    bool all = true;
                    for (uint32_t cp : c.cps) {
                        auto it = cb.find(cp);
                        if (it == cb.end()) {
                            all = false;
                            break;
                        }
                        mine += static_cast<char>(it->second);
                    }
                    bytes += all ? mine : tok;
                }
                tokens.assign(1, from_utf8_lossy(bytes));
                break;
            }
            case DecStep::Replace:
                for (std::string& tok : tokens) tok = replace_all(tok, s.a, s.b);
                break;
            case DecStep::ByteFallback: {
                std::vector<std::string> next;
                std::string pending;
                size_t pending_n = 0;
                auto flush = [&] {
                    if (!pending_n) return;
                    if (utf8_length(pending) >= 0) next.push_back(pending);
                    else
                        for (size_t k = 0; k < pending_n; ++k) next.push_back(kReplacement);
                    pending.clear();
                    pending_n = 0;
                };
                for (std::string& tok : tokens) {
                    auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); };
                    if (tok.size() == 6 && tok.compare(0, 3, "<0x") == 0 && tok[5] == '>' && hex(tok[3]) && hex(tok[4])) {
                        pending += static_cast<char>(std::stoi(tok.substr(3, 2), nullptr, 16));
                        ++pending_n;
                    } else {
                        flush();
                        next.push_back(std::move(tok));
                    }
                }
                flush();
                tokens = std::move(next);
                break;
            }
            case DecStep::Fuse: {
                std::string all;
                for (const std::string& tok : tokens) all += tok;
                tokens.assign(1, all);
                break;
            }
            case DecStep::Strip:
                for (std::string& tok : tokens) {
                    Chars c(tok);
                    const uint32_t ch = Chars(s.a).cps[0];
                    size_t start = 0, stop = c.cps.size();
                    for (size_t i = 0; i < s.start && i < c.cps.size() && c.cps[i] == ch; ++i) start = i + 1;
                    for (size_t i = 0; i < s.stop && i < c.cps.size(); ++i) {
                        size_t k = c.cps.size() - i - 1;
                        if (k < start || c.cps[k] != ch) break;
                        stop = k;
                    }
                    tok = start >= stop ? std::string() : tok.substr(c.offsets[start], c.offsets[stop] - c.offsets[start]);
                }
                break;
            case DecStep::Metaspace:
                for (size_t i = 0; i < tokens.size(); ++i) {
                    tokens[i] = replace_all(tokens[i], s.a, " ");
                    if (s.prepend && i == 0 && !tokens[i].empty() && tokens[i][0] == ' ') tokens[i].erase(0, 1);
                }
                break;
        }
    }
    std::string out;
    for (const std::string& tok : tokens) out += tok;
    return out;
}

// ---- streaming --------------------------------------------------------------------------------

TextStream::TextStream(const Tokenizer& tok, std::vector<int32_t> hidden_ids, std::vector<std::string> stop_strings)
    : tok_(tok), hidden_(std::move(hidden_ids)), stops_(std::move(stop_strings)) {}

void TextStream::finish(const std::vector<int32_t>& tokens) {
    for (int32_t t : tokens)
        if (std::find(hidden_.begin(), hidden_.end(), t) == hidden_.end()) visible_.push_back(t);
    text_ = tok_.decode(visible_, /*skip_special_tokens=*/true);
    emitted_ = text_.size();
}

std::string TextStream::push(int32_t token, bool finishing, bool* stopped) {
    *stopped = false;
    if (std::find(hidden_.begin(), hidden_.end(), token) == hidden_.end()) visible_.push_back(token);
    std::string text = tok_.decode(visible_, /*skip_special_tokens=*/true);
    for (const std::string& stop : stops_) {
        size_t cut = text.find(stop);
        if (cut != std::string::npos) {
            text.resize(cut);
            *stopped = true;
        }
    }
    const bool partial = text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacement) == 0;
    if (partial && !finishing && !*stopped) return "";
    text_ = std::move(text);
    std::string delta = text_.size() > emitted_ ? text_.substr(emitted_) : std::string();
    emitted_ = text_.size();
    return delta;
}

}  // namespace omniforge

namespace omniforge {

namespace {

std::optional<std::string> config_token(const json& cfg, const char* key) {
    auto it = cfg.find(key);
    if (it == cfg.end()) return std::nullopt;
    const json* v = &*it;
    if (v->is_object()) {  // {"content": "</s>", ...}
        auto c = v->find("content");
        if (c == v->end()) return std::nullopt;
        v = &*c;
    }
    if (!v->is_string()) return std::nullopt;
    return v->get<std::string>();
}

}  // namespace

BuildTokenizer load_build_tokenizer(const BuildImpl& b) {
    const Manifest& m = b.manifest;
    auto it = m.files.find("tokenizer");
    if (it == m.files.end()) fail(OF_ERR_UNSUPPORTED, "this build carries no tokenizer; pass token ids instead of text");
    std::vector<char> data = read_verified(b.folder, m, it->second);
    BuildTokenizer t;
    t.tok = Tokenizer::from_json(std::string(data.begin(), data.end()), it->second);
    if (auto c = m.files.find("tokenizer_config"); c != m.files.end()) {
        std::vector<char> cdata = read_verified(b.folder, m, c->second);
        json cfg = json::parse(cdata.begin(), cdata.end(), nullptr, /*allow_exceptions=*/false);
        if (cfg.is_discarded() || !cfg.is_object()) fail(OF_ERR_MANIFEST, c->second + " is not a JSON object");
        if (auto e = config_token(cfg, "eos_token")) t.eos = t.tok->token_to_id(*e);
        if (auto s = config_token(cfg, "bos_token")) t.bos = t.tok->token_to_id(*s);
        auto ab = cfg.find("add_bos_token");
        t.add_bos = ab != cfg.end() && ab->is_boolean() && ab->get<bool>();
    }
    return t;
}

std::vector<int32_t> encode_text(const BuildTokenizer& t, const std::string& text, int64_t max_tokens, bool special) {
    const int64_t chars = utf8_length(text);
    if (chars < 0)
        fail(OF_ERR_INPUT, "the prompt is not valid UTF-8 text (byte " + std::to_string(-chars - 1) + " starts an invalid sequence)");
    if (max_tokens >= 0 && double(chars) > 4.0 * double(max_tokens) * double(t.tok->max_token_chars()))
        fail(OF_ERR_CONTEXT_LENGTH, "the prompt has " + std::to_string(chars) + " characters, too many to fit however it is split: the context holds " +
                                        std::to_string(max_tokens) + " tokens");
    std::vector<int32_t> ids = t.tok->encode(text, special);
    if (special && t.add_bos && t.bos && (ids.empty() || ids[0] != *t.bos)) ids.insert(ids.begin(), *t.bos);
    return ids;
}

}  // namespace omniforge
