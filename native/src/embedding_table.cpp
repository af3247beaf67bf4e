// The token-embedding stage read as a table (as EmbeddingTable.from_onnx in
// omniforge/runtime/llm.py): a single Gather over an FP32 initializer, or the INT8 form
// Gather(table_int8) -> Cast -> Gather(row_scale) -> Mul. The graph's protobuf is walked with a
// small wire-format reader (ModelProto.graph -> GraphProto.node / initializer); any other form,
// or anything the reader does not expect, leaves the lookup to a session.
#include <cstring>

#include "internal.hpp"
#include "proto_reader.hpp"

namespace omniforge {

namespace {

struct Node {
    std::string op;
    std::vector<std::string> inputs;
};

struct Tensor {
    std::vector<int64_t> dims;
    int32_t type = 0;
    bool external = false;
    Reader raw{nullptr, nullptr};
    std::vector<float> floats;   // float_data
    std::vector<int32_t> ints;   // int32_data (int8 values when not raw)
    bool has_raw = false;
};

constexpr int kFloat = 1, kInt8 = 3;

Node read_node(Reader r) {
    Node n;
    while (r.more()) {
        uint64_t key = r.varint();
        unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
        if (field == 1 && wire == 2) n.inputs.push_back(r.str());
        else if (field == 4 && wire == 2) n.op = r.str();
        else r.skip(wire);
    }
    if (!r.ok) n.op.clear();
    return n;
}

bool read_tensor(Reader r, std::string& name, Tensor& t) {
    while (r.more()) {
        uint64_t key = r.varint();
        unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
        if (field == 1 && wire == 0) t.dims.push_back(int64_t(r.varint()));
        else if (field == 1 && wire == 2) {
            Reader d = r.sub();
            while (d.more()) t.dims.push_back(int64_t(d.varint()));
            r.ok = r.ok && d.ok;
        } else if (field == 2 && wire == 0) t.type = int32_t(r.varint());
        else if (field == 4 && wire == 2) {
            Reader d = r.sub();
            size_t n = size_t(d.end - d.p) / 4;
            t.floats.resize(n);
            if (n) std::memcpy(t.floats.data(), d.p, n * 4);
        } else if (field == 4 && wire == 5) {
            if (r.end - r.p < 4) return false;
            float f;
            std::memcpy(&f, r.p, 4);
            r.p += 4;
            t.floats.push_back(f);
        } else if (field == 5 && wire == 2) {
            Reader d = r.sub();
            while (d.more()) t.ints.push_back(int32_t(d.varint()));
            r.ok = r.ok && d.ok;
        } else if (field == 5 && wire == 0) t.ints.push_back(int32_t(r.varint()));
        else if (field == 8 && wire == 2) name = r.str();
        else if (field == 9 && wire == 2) {
            t.raw = r.sub();
            t.has_raw = true;
        } else if (field == 13 && wire == 2) {
            r.sub();
            t.external = true;
        } else if (field == 14 && wire == 0) t.external = t.external || r.varint() == 1;
        else r.skip(wire);
    }
    return r.ok;
}

// The tensor's values (FP32 into floats, INT8 into int8 codes, `count` elements); false otherwise.
bool values(const Tensor& t, size_t count, std::vector<float>& out) {
    if (t.external || t.type != kFloat) return false;
    out.resize(count);
    if (t.has_raw) {
        if (size_t(t.raw.end - t.raw.p) != count * 4) return false;
        if (count) std::memcpy(out.data(), t.raw.p, count * 4);  // little-endian, as ONNX stores it
    } else {
        if (t.floats.size() != count) return false;
        out = t.floats;
    }
    return true;
}

bool values(const Tensor& t, size_t count, std::vector<int8_t>& out) {
    if (t.external || t.type != kInt8) return false;
    out.resize(count);
    if (t.has_raw) {
        if (size_t(t.raw.end - t.raw.p) != count) return false;
        if (count) std::memcpy(out.data(), t.raw.p, count);
    } else {
        if (t.ints.size() != count) return false;
        for (size_t i = 0; i < count; ++i) out[i] = static_cast<int8_t>(t.ints[i]);
    }
    return true;
}

}  // namespace

bool read_embedding_table(const std::vector<char>& graph, int64_t vocab, int64_t hidden, EmbeddingTable& table) {
    Reader model{reinterpret_cast<const unsigned char*>(graph.data()),
                 reinterpret_cast<const unsigned char*>(graph.data()) + graph.size()};
    Reader g{nullptr, nullptr};
    bool found = false;
    while (model.more()) {
        uint64_t key = model.varint();
        if ((key >> 3) == 7 && (key & 7) == 2) {
            g = model.sub();
            found = true;
        } else {
            model.skip(unsigned(key & 7));
        }
    }
    if (!model.ok || !found) return false;
    std::vector<Node> nodes;
    std::map<std::string, Tensor> inits;
    while (g.more()) {
        uint64_t key = g.varint();
        unsigned field = unsigned(key >> 3), wire = unsigned(key & 7);
        if (field == 1 && wire == 2) nodes.push_back(read_node(g.sub()));
        else if (field == 5 && wire == 2) {
            std::string name;
            Tensor t;
            if (!read_tensor(g.sub(), name, t)) return false;
            inits[name] = std::move(t);
        } else {
            g.skip(wire);
        }
    }
    if (!g.ok) return false;
    for (const auto& [name, t] : inits)
        if (t.external) return false;  // external data is never read here: the session does it
    const size_t rows = size_t(vocab) * size_t(hidden);
    auto shaped = [&](const Tensor& t, std::vector<int64_t> dims) { return t.dims == dims; };
    if (nodes.size() == 1 && nodes[0].op == "Gather" && !nodes[0].inputs.empty() && inits.count(nodes[0].inputs[0])) {
        const Tensor& t = inits[nodes[0].inputs[0]];
        if (t.type != kFloat || !shaped(t, {vocab, hidden})) return false;
        table.scale.clear();
        table.codes.clear();
        return values(t, rows, table.rows);
    }
    if (nodes.size() == 4 && nodes[0].op == "Gather" && nodes[1].op == "Cast" && nodes[2].op == "Gather" &&
        nodes[3].op == "Mul" && inits.count("table_int8") && inits.count("row_scale")) {
        const Tensor& q = inits["table_int8"];
        const Tensor& s = inits["row_scale"];
        if (q.type != kInt8 || !shaped(q, {vocab, hidden}) || s.type != kFloat ||
            !(shaped(s, {vocab, 1}) || shaped(s, {vocab})))
            return false;
        table.rows.clear();
        return values(q, rows, table.codes) && values(s, size_t(vocab), table.scale);
    }
    return false;
}

}  // namespace omniforge
