// A small reader of protobuf's wire format, enough to walk the parts of an ONNX graph the
// library looks at (the embedding table, external-data references) without linking protobuf.
#pragma once

#include <cstdint>
#include <string>

namespace omniforge {

struct Reader {
    const unsigned char* p;
    const unsigned char* end;
    bool ok = true;

    bool more() const { return ok && p < end; }
    uint64_t varint() {
        uint64_t v = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (p >= end) break;
            unsigned char b = *p++;
            v |= uint64_t(b & 0x7f) << shift;
            if (!(b & 0x80)) return v;
        }
        ok = false;
        return 0;
    }
    // A length-delimited field's bytes.
    Reader sub() {
        uint64_t n = varint();
        if (!ok || n > uint64_t(end - p)) {
            ok = false;
            return {end, end};
        }
        Reader r{p, p + n};
        p += n;
        return r;
    }
    void skip(unsigned wire) {
        switch (wire) {
            case 0: varint(); break;
            case 1: if (end - p < 8) ok = false; else p += 8; break;
            case 2: sub(); break;
            case 5: if (end - p < 4) ok = false; else p += 4; break;
            default: ok = false;
        }
    }
    std::string str() {
        Reader r = sub();
        return std::string(reinterpret_cast<const char*>(r.p), size_t(r.end - r.p));
    }
};

}  // namespace omniforge
