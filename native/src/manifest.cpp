// manifest.json: schema version 2, the path rules and artifact verification, as the Python
// runtime applies them (omniforge/pipeline/manifest.py).
#include <openssl/evp.h>
#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "config_values.hpp"
#include "internal.hpp"

namespace omniforge {

using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxManifestBytes = 64ull << 20;  // as MAX_MANIFEST_BYTES in Python
constexpr int kMaxDepth = 64;                         // JSON nesting the manifest never needs
constexpr size_t kMaxPath = 1024;                     // the schema's relPath maxLength

std::string shown(const std::string& s) {
    std::string out;
    for (char c : s.substr(0, 200)) {
        unsigned char u = static_cast<unsigned char>(c);
        if (u < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", u);
            out += buf;
        } else {
            out += c;
        }
    }
    return "'" + out + (s.size() > 200 ? "...'" : "'");
}

[[noreturn]] void bad(const std::string& message) { fail(OF_ERR_MANIFEST, message); }

// Refuse nesting deeper than kMaxDepth before the parser sees the text.
void check_depth(const std::string& text) {
    int depth = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
            continue;
        }
        if (c == '"') in_string = true;
        else if (c == '{' || c == '[') {
            if (++depth > kMaxDepth) bad("manifest.json nests deeper than " + std::to_string(kMaxDepth) + " levels; not a manifest omniforge writes");
        } else if (c == '}' || c == ']') --depth;
    }
}

const json& member(const json& obj, const char* key, const std::string& where) {
    if (!obj.is_object()) bad("manifest is malformed: " + where + " must be an object");
    auto it = obj.find(key);
    if (it == obj.end()) bad("manifest is malformed: " + where + " has no '" + key + "'");
    return *it;
}

std::string str(const json& v, const std::string& where) {
    if (!v.is_string()) bad("manifest is malformed: " + where + " must be a string");
    return v.get<std::string>();
}

int64_t integer(const json& v, const std::string& where, int64_t lo, int64_t hi) {
    if (!v.is_number_integer()) bad("manifest is malformed: " + where + " must be an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        bad("manifest is malformed: " + where + " is out of range");
    int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) bad("manifest is malformed: " + where + " must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(x));
    return x;
}

const char* const kRoles[] = {"canonical", "ort", "ort_inplace_llm", "qdq", "weight_only_dq", "tensorrt_engine"};
const char* const kDtypes[] = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"};

TensorSpec tensor(const json& t, const std::string& where) {
    TensorSpec out;
    out.name = str(member(t, "name", where), where + ".name");
    if (out.name.empty() || out.name.size() > 256) bad("manifest is malformed: " + where + " has a name of bad length");
    for (char c : out.name)
        if (static_cast<unsigned char>(c) < 0x20) bad("manifest is malformed: tensor name " + shown(out.name) + " holds a control character");
    out.dtype = str(member(t, "dtype", where), where + ".dtype");
    bool known = false;
    for (const char* d : kDtypes) known = known || out.dtype == d;
    if (!known) bad("manifest is malformed: " + where + " has dtype " + shown(out.dtype) + ", which omniforge does not write");
    const json& shape = member(t, "shape", where);
    if (!shape.is_array() || shape.size() > 16) bad("manifest is malformed: " + where + ".shape must be a list of at most 16 sizes");
    for (const json& d : shape) {
        if (d.is_string()) out.shape.push_back(-1);
        else out.shape.push_back(integer(d, where + ".shape", 0, int64_t(1) << 40));
    }
    return out;
}

std::vector<TensorSpec> tensors(const json& list, const std::string& where) {
    if (!list.is_array() || list.size() > 4096) bad("manifest is malformed: " + where + " must be a list of tensors");
    std::vector<TensorSpec> out;
    for (size_t i = 0; i < list.size(); ++i) out.push_back(tensor(list[i], where + "[" + std::to_string(i) + "]"));
    return out;
}

Contract contract(const json& c, const std::string& where) {
    Contract out;
    out.inputs = tensors(member(c, "inputs", where), where + ".inputs");
    out.outputs = tensors(member(c, "outputs", where), where + ".outputs");
    if (auto it = c.find("inplace"); it != c.end()) {
        if (!it->is_array()) bad("manifest is malformed: " + where + ".inplace must be a list");
        for (const json& p : *it)
            out.inplace.emplace_back(str(member(p, "input", where + ".inplace"), where + ".inplace.input"),
                                     str(member(p, "output", where + ".inplace"), where + ".inplace.output"));
    }
    if (auto it = c.find("slots"); it != c.end()) {
        if (!it->is_object()) bad("manifest is malformed: " + where + ".slots must be an object");
        for (auto& [k, v] : it->items()) out.slots[k] = str(v, where + ".slots." + k);
    }
    return out;
}

}  // namespace

std::string Contract::slot(const std::string& purpose) const {
    auto it = slots.find(purpose);
    if (it == slots.end()) fail(OF_ERR_MANIFEST, "the contract names no tensor for the slot '" + purpose + "'");
    return it->second;
}

const Variant* StageBuild::find(const std::string& role) const {
    for (const Variant& v : variants)
        if (v.role == role) return &v;
    return nullptr;
}

const StageBuild& Manifest::stage(const std::string& name) const {
    auto it = stages.find(name);
    if (it == stages.end()) fail(OF_ERR_MANIFEST, "this build has no stage '" + name + "'");
    return it->second;
}

const StageSpec& Manifest::spec(const std::string& name) const {
    auto it = pipeline.find(name);
    if (it == pipeline.end()) fail(OF_ERR_MANIFEST, "the build's pipeline does not describe the stage '" + name + "'");
    return it->second;
}

const Variant& Manifest::variant(const std::string& name, const std::string& role) const {
    const Variant* v = stage(name).find(role);
    if (!v) fail(OF_ERR_MANIFEST, "stage '" + name + "' has no '" + role + "' variant");
    return *v;
}

const Variant& Manifest::served(const std::string& name) const {
    const StageBuild& sb = stage(name);
    if (const Variant* v = sb.find("ort")) return *v;
    return variant(name, "canonical");
}

const Contract& Manifest::contract(const std::string& name, const Variant& v) const {
    return v.stage_contract ? spec(name).io : v.contract;
}

void check_relative(const std::string& p) {
    // PurePosixPath(p): absolute, or a '..' part; the schema: no backslash, no control character
    bool dotdot = false;
    size_t start = 0;
    while (start <= p.size()) {
        size_t end = p.find('/', start);
        if (end == std::string::npos) end = p.size();
        if (p.compare(start, end - start, "..") == 0 && end - start == 2) dotdot = true;
        start = end + 1;
    }
    if (p.empty() || p[0] == '/' || dotdot || p.find('\\') != std::string::npos)
        fail(OF_ERR_MANIFEST, "artifact path " + shown(p) + " leaves the build folder");
    for (char c : p)
        if (static_cast<unsigned char>(c) < 0x20)
            fail(OF_ERR_MANIFEST, "artifact path " + shown(p) + " holds a control character");
    if (p.size() > kMaxPath) fail(OF_ERR_MANIFEST, "artifact path " + shown(p) + " is longer than " + std::to_string(kMaxPath) + " characters");
}

Manifest read_manifest(const std::string& folder) {
    const std::string path = folder + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
        fail(OF_ERR_MANIFEST, "'" + folder + "' is not a build folder (no manifest.json)");
    if (static_cast<uint64_t>(st.st_size) > kMaxManifestBytes)
        bad(path + " is larger than 64 MiB; not a manifest omniforge writes");
    std::ifstream f(path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (!f.good() && !f.eof()) bad(path + " could not be read");
    check_depth(text);
    json d = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (d.is_discarded()) bad(path + " is not valid JSON");
    if (!d.is_object()) bad("manifest must be a JSON object");
    auto version = d.find("schema_version");
    if (version == d.end() || !version->is_number_integer() || version->get<int64_t>() != 2) {
        std::string got = version == d.end() ? "missing" : version->dump();
        bad("manifest schema version " + got.substr(0, 40) + " is not supported (libomniforge reads version 2); rebuild with this omniforge");
    }

    Manifest m;
    const json& pipeline = member(d, "pipeline", "the manifest");
    const json& pstages = member(pipeline, "stages", "pipeline");
    if (!pstages.is_array()) bad("manifest is malformed: pipeline.stages must be a list");
    for (const json& s : pstages) {
        StageSpec spec;
        spec.name = str(member(s, "name", "a pipeline stage"), "a pipeline stage's name");
        std::string where = "pipeline stage '" + spec.name + "'";
        spec.kind = str(member(s, "kind", where), where + ".kind");
        spec.io.inputs = tensors(member(s, "inputs", where), where + ".inputs");
        spec.io.outputs = tensors(member(s, "outputs", where), where + ".outputs");
        if (auto it = s.find("llm"); it != s.end() && !it->is_null()) {
            const json& g = *it;
            auto geo = [&](const char* k) { return integer(member(g, k, where + ".llm"), where + ".llm." + k, 1, 1 << 24); };
            spec.has_llm = true;
            spec.llm = {geo("num_layers"), geo("num_heads"), geo("num_kv_heads"), geo("head_dim"),
                        geo("hidden_size"), geo("vocab_size"), geo("max_context")};
        }
        if (!m.pipeline.emplace(spec.name, spec).second) bad("manifest is malformed: the pipeline describes stage '" + spec.name + "' twice");
    }

    if (auto it = pipeline.find("signal_tokens"); it != pipeline.end() && !it->is_null()) {
        if (!it->is_object()) bad("manifest is malformed: pipeline.signal_tokens must be an object");
        for (auto& [modality, list] : it->items()) {
            if (!list.is_array() || list.size() > 4096) bad("manifest is malformed: pipeline.signal_tokens." + modality + " must be a list");
            for (const json& t : list) m.signal_tokens.emplace_back(modality, str(t, "a signal token"));
        }
    }
    if (auto it = pipeline.find("placeholders"); it != pipeline.end() && !it->is_null()) {
        if (!it->is_object()) bad("manifest is malformed: pipeline.placeholders must be an object");
        for (auto& [modality, t] : it->items()) m.placeholders.emplace_back(modality, str(t, "a placeholder token"));
    }

    const json& arts = member(d, "artifacts", "the manifest");
    if (!arts.is_array() || arts.size() > 100000) bad("manifest is malformed: artifacts must be a list of at most 100000 files");
    for (const json& a : arts) {
        Artifact art;
        art.path = str(member(a, "path", "an artifact"), "an artifact's path");
        check_relative(art.path);
        art.sha256 = str(member(a, "sha256", "artifact " + shown(art.path)), "an artifact's sha256");
        bool hex = art.sha256.size() == 64;
        for (char c : art.sha256) hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
        if (!hex) bad("manifest is malformed: artifact " + shown(art.path) + " has a sha256 that is not 64 lowercase hex digits");
        art.size = static_cast<uint64_t>(integer(member(a, "size", "artifact " + shown(art.path)), "an artifact's size", 0, int64_t(1) << 40));
        m.artifacts[art.path] = art;
    }

    const json& stages = member(d, "stages", "the manifest");
    if (!stages.is_object()) bad("manifest is malformed: stages must be an object");
    for (auto& [name, sb] : stages.items()) {
        if (!m.pipeline.count(name)) bad("manifest builds stage '" + name + "', which its pipeline does not describe");
        std::string where = "stage '" + name + "'";
        const json& vs = member(sb, "variants", where);
        if (!vs.is_array()) bad("manifest is malformed: " + where + ".variants must be a list (a version-1 manifest?)");
        StageBuild out;
        for (const json& v : vs) {
            Variant var;
            var.role = str(member(v, "role", where + " variant"), where + " variant role");
            bool known_role = false;
            for (const char* r : kRoles) known_role = known_role || var.role == r;
            if (!known_role) bad("stage '" + name + "' has a variant of role " + shown(var.role) + ", which libomniforge does not know");
            std::string vw = where + " variant '" + var.role + "'";
            var.file = str(member(v, "file", vw), vw + ".file");
            check_relative(var.file);
            if (auto it = v.find("precision"); it != v.end()) var.precision = str(*it, vw + ".precision");
            if (auto it = v.find("data_files"); it != v.end()) {
                if (!it->is_array()) bad("manifest is malformed: " + vw + ".data_files must be a list");
                for (const json& f : *it) {
                    var.data_files.push_back(str(f, vw + ".data_files"));
                    check_relative(var.data_files.back());
                }
            }
            const json& c = member(v, "contract", vw);
            if (c.is_string()) {
                if (c.get<std::string>() != "stage") bad("manifest is malformed: " + vw + " has contract " + shown(c.get<std::string>()) + " (only \"stage\" or an object)");
            } else {
                var.stage_contract = false;
                var.contract = contract(c, vw + ".contract");
            }
            if (out.find(var.role)) bad("stage '" + name + "' lists a variant role twice");
            for (const std::string& p : var.data_files)
                if (!m.artifacts.count(p)) bad("stage '" + name + "' names " + shown(p) + ", which is not among the artifacts");
            if (!m.artifacts.count(var.file)) bad("stage '" + name + "' names " + shown(var.file) + ", which is not among the artifacts");
            out.variants.push_back(std::move(var));
        }
        if (!out.find("canonical")) bad("stage '" + name + "' has no canonical variant");
        m.stages[name] = std::move(out);
    }

    if (auto it = d.find("files"); it != d.end()) {
        if (!it->is_object()) bad("manifest is malformed: files must be an object");
        for (auto& [role, p] : it->items()) {
            std::string rel = str(p, "file '" + role + "'");
            check_relative(rel);
            if (!m.artifacts.count(rel)) bad("file '" + role + "' -> " + shown(rel) + " is not among the artifacts");
            m.files[role] = rel;
        }
    }
    return m;
}

std::string checked_path(const std::string& root_real, const std::string& folder, const std::string& rel) {
    const std::string f = folder + "/" + rel;
    char buf[PATH_MAX];
    if (!::realpath(f.c_str(), buf)) {
        if (errno == ENOENT || errno == ENOTDIR)
            fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " is missing from " + folder + " or is not a regular file");
        fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " cannot be resolved inside " + folder);
    }
    std::string real(buf);
    if (real.compare(0, root_real.size(), root_real) != 0 || real.size() <= root_real.size() ||
        (root_real != "/" && real[root_real.size()] != '/'))
        fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " resolves outside the build folder");
    struct stat st {};
    if (::stat(real.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
        fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " is missing from " + folder + " or is not a regular file");
    return real;
}

namespace {

std::string real_folder(const std::string& folder) {
    char buf[PATH_MAX];
    if (!::realpath(folder.c_str(), buf)) fail(OF_ERR_MANIFEST, "'" + folder + "' cannot be resolved");
    return buf;
}

[[noreturn]] void mismatch(const std::string& rel) {
    fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " does not match its SHA-256 in the manifest (corrupted or modified)");
}

struct Digest {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    Digest() {
        if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) fail(OF_ERR_INTERNAL, "OpenSSL could not start a SHA-256 digest");
    }
    ~Digest() { EVP_MD_CTX_free(ctx); }
    void update(const void* p, size_t n) {
        if (EVP_DigestUpdate(ctx, p, n) != 1) fail(OF_ERR_INTERNAL, "OpenSSL failed while hashing");
    }
    std::string hex() {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int len = 0;
        if (EVP_DigestFinal_ex(ctx, md, &len) != 1) fail(OF_ERR_INTERNAL, "OpenSSL failed while hashing");
        static const char* digits = "0123456789abcdef";
        std::string out;
        for (unsigned i = 0; i < len; ++i) {
            out += digits[md[i] >> 4];
            out += digits[md[i] & 15];
        }
        return out;
    }
};

struct File {
    std::FILE* f;
    explicit File(const std::string& p) : f(std::fopen(p.c_str(), "rb")) {}
    ~File() {
        if (f) std::fclose(f);
    }
};

}  // namespace

std::string sha256_hex(const void* data, size_t n) {
    Digest d;
    d.update(data, n);
    return d.hex();
}

namespace {

void verify_one(const std::string& root, const std::string& folder, const std::string& rel, const Artifact& a, bool sizes_only,
                std::vector<char>& buf) {
    std::string p = checked_path(root, folder, rel);
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_size) != a.size) mismatch(rel);
    if (sizes_only) return;
    File f(p);
    if (!f.f) fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " cannot be opened");
    Digest d;
    uint64_t total = 0;
    size_t got;
    while ((got = std::fread(buf.data(), 1, buf.size(), f.f)) > 0) {
        d.update(buf.data(), got);
        total += got;
    }
    if (total != a.size || d.hex() != a.sha256) mismatch(rel);
}

}  // namespace

void verify_artifacts(const std::string& folder, const Manifest& m, bool sizes_only) {
    const std::string root = real_folder(folder);
    std::vector<char> buf(1 << 20);
    for (const auto& [rel, a] : m.artifacts) verify_one(root, folder, rel, a, sizes_only, buf);
}

void verify_artifact(const std::string& folder, const Manifest& m, const std::string& rel) {
    auto it = m.artifacts.find(rel);
    if (it == m.artifacts.end()) fail(OF_ERR_MANIFEST, shown(rel) + " is not among the build's artifacts");
    std::vector<char> buf(1 << 20);
    verify_one(real_folder(folder), folder, rel, it->second, false, buf);
}

std::vector<char> read_verified(const std::string& folder, const Manifest& m, const std::string& rel) {
    auto it = m.artifacts.find(rel);
    if (it == m.artifacts.end()) fail(OF_ERR_MANIFEST, shown(rel) + " is not among the build's artifacts");
    std::string p = checked_path(real_folder(folder), folder, rel);
    File f(p);
    if (!f.f) fail(OF_ERR_MANIFEST, "artifact " + shown(rel) + " cannot be opened");
    std::vector<char> data(it->second.size + 1);
    size_t got = std::fread(data.data(), 1, data.size(), f.f);
    if (got != it->second.size) mismatch(rel);
    data.resize(got);
    if (sha256_hex(data.data(), data.size()) != it->second.sha256) mismatch(rel);
    return data;
}

json read_config(const BuildImpl& b, const std::string& role) {
    auto it = b.manifest.files.find(role);
    if (it == b.manifest.files.end()) fail(OF_ERR_MANIFEST, "this build has no '" + role + "' file");
    std::vector<char> data = read_verified(b.folder, b.manifest, it->second);
    json d = json::parse(data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
    if (d.is_discarded()) fail(OF_ERR_MANIFEST, "'" + it->second + "' is not valid JSON");
    return d;
}

}  // namespace omniforge
