// The external-data files a serialized ONNX graph reads (as external_data_refs in
// omniforge/runtime/build.py): every tensor of the graph and its subgraphs (initializers and node
// attributes) stored with data_location EXTERNAL, its 'location' resolved against the graph's folder.
#include <set>

#include "internal.hpp"
#include "proto_reader.hpp"

namespace omniforge {

namespace {

// ONNX's field numbers
constexpr unsigned kModelGraph = 7;
constexpr unsigned kGraphNode = 1, kGraphInitializer = 5;
constexpr unsigned kNodeAttribute = 5;
constexpr unsigned kAttrTensor = 5, kAttrGraph = 6, kAttrTensors = 10, kAttrGraphs = 11;
constexpr unsigned kTensorExternalData = 13, kTensorDataLocation = 14;
constexpr uint64_t kExternal = 1;

[[noreturn]] void not_a_graph(const std::string& rel) { fail(OF_ERR_MANIFEST, "'" + rel + "' is not an ONNX graph"); }

// posixpath.normpath of a relative path ('.' parts dropped, 'a/..' folded; a leading '..' kept)
std::string normalized(const std::string& p) {
    std::vector<std::string> parts;
    size_t start = 0;
    while (start <= p.size()) {
        size_t end = p.find('/', start);
        if (end == std::string::npos) end = p.size();
        std::string part = p.substr(start, end - start);
        if (part == "..") {
            if (!parts.empty() && parts.back() != "..") parts.pop_back();
            else parts.push_back(part);
        } else if (!part.empty() && part != ".") {
            parts.push_back(part);
        }
        start = end + 1;
    }
    std::string out;
    for (const std::string& part : parts) out += (out.empty() ? "" : "/") + part;
    return out.empty() ? "." : out;
}

struct Walk {
    const std::string& rel;
    std::string folder;  // the graph's folder inside the build ("" at the top)
    std::set<std::string> refs;

    void tensor(Reader r) {
        bool external = false;
        std::string location;
        while (r.more()) {
            uint64_t key = r.varint();
            unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
            if (field == kTensorExternalData && wire == 2) {
                Reader e = r.sub();
                std::string k, v;
                while (e.more()) {
                    uint64_t ek = e.varint();
                    unsigned ef = unsigned(ek >> 3), ew = unsigned(ek & 7);
                    if (ef == 1 && ew == 2) k = e.str();
                    else if (ef == 2 && ew == 2) v = e.str();
                    else e.skip(ew);
                }
                if (!e.ok) not_a_graph(rel);
                if (k == "location") location = v;
            } else if (field == kTensorDataLocation && wire == 0) {
                external = r.varint() == kExternal;
            } else {
                r.skip(wire);
            }
        }
        if (!r.ok) not_a_graph(rel);
        if (!external) return;
        std::string ref = normalized(folder.empty() ? location : folder + "/" + location);
        check_relative(ref);
        refs.insert(ref);
    }

    void graph(Reader r) {
        while (r.more()) {
            uint64_t key = r.varint();
            unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
            if (field == kGraphInitializer && wire == 2) tensor(r.sub());
            else if (field == kGraphNode && wire == 2) node(r.sub());
            else r.skip(wire);
        }
        if (!r.ok) not_a_graph(rel);
    }

    void node(Reader r) {
        while (r.more()) {
            uint64_t key = r.varint();
            unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
            if (field == kNodeAttribute && wire == 2) attribute(r.sub());
            else r.skip(wire);
        }
        if (!r.ok) not_a_graph(rel);
    }

    void attribute(Reader r) {
        while (r.more()) {
            uint64_t key = r.varint();
            unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
            if ((field == kAttrTensor || field == kAttrTensors) && wire == 2) tensor(r.sub());
            else if ((field == kAttrGraph || field == kAttrGraphs) && wire == 2) graph(r.sub());
            else r.skip(wire);
        }
        if (!r.ok) not_a_graph(rel);
    }
};

}  // namespace

std::vector<std::string> external_data_refs(const std::vector<char>& data, const std::string& rel) {
    Walk w{rel, {}, {}};
    size_t slash = rel.rfind('/');
    if (slash != std::string::npos) w.folder = rel.substr(0, slash);
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    Reader r{p, p + data.size()};
    bool seen = false;
    while (r.more()) {
        uint64_t key = r.varint();
        unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
        if (field == kModelGraph && wire == 2) {
            w.graph(r.sub());
            seen = true;
        } else {
            r.skip(wire);
        }
    }
    if (!r.ok || !seen) not_a_graph(rel);
    return {w.refs.begin(), w.refs.end()};
}

}  // namespace omniforge
