// Stage sessions shared by the encoders and decoders: a stage's served variant opened with the
// names it binds, run on float32 inputs, and the shapes its manifest entry describes.
#include "stage_session.hpp"

#include <sys/stat.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

namespace omniforge {

using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxManifestBytes = 64ull << 20;
}  // namespace

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

size_t product(const std::vector<int64_t>& s) {
    size_t n = 1;
    for (int64_t d : s) n *= size_t(d);
    return n;
}

bool all_finite(const float* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) return false;
    return true;
}

StageDims stage_dims(const BuildImpl& b, const std::string& stage) {
    const std::string path = b.folder + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || uint64_t(st.st_size) > kMaxManifestBytes)
        fail(OF_ERR_MANIFEST, "manifest.json of '" + b.folder + "' can no longer be read");
    std::ifstream f(path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    json d = json::parse(text, nullptr, /*allow_exceptions=*/false);
    const StageSpec& spec = b.manifest.spec(stage);
    const std::string changed = "manifest.json changed after the build was opened (stage '" + stage + "')";
    if (d.is_discarded() || !d.is_object() || !d.contains("pipeline") || !d["pipeline"].is_object() ||
        !d["pipeline"].contains("stages") || !d["pipeline"]["stages"].is_array())
        fail(OF_ERR_MANIFEST, changed);
    for (const json& s : d["pipeline"]["stages"]) {
        if (!s.is_object() || !s.contains("name") || s["name"] != stage) continue;
        StageDims out;
        if (s.contains("component") && s["component"].is_string()) out.component = s["component"].get<std::string>();
        if (s.contains("dims")) {
            if (!s["dims"].is_array()) fail(OF_ERR_MANIFEST, "manifest is malformed: pipeline stage '" + stage + "'.dims must be a list");
            for (const json& dim : s["dims"]) {
                if (!dim.is_object() || !dim.contains("name") || !dim["name"].is_string() || !dim.contains("opt") ||
                    !dim["opt"].is_number_integer() || dim["opt"].get<int64_t>() < 1 || dim["opt"].get<int64_t>() > (int64_t(1) << 40))
                    fail(OF_ERR_MANIFEST, "manifest is malformed: a dim of pipeline stage '" + stage + "' has no name or no positive 'opt'");
                out.opt[dim["name"].get<std::string>()] = dim["opt"].get<int64_t>();
            }
        }
        const json& inputs = s.contains("inputs") ? s["inputs"] : json();
        if (!inputs.is_array() || inputs.size() != spec.io.inputs.size()) fail(OF_ERR_MANIFEST, changed);
        for (size_t i = 0; i < inputs.size(); ++i) {
            const json& t = inputs[i];
            const TensorSpec& want = spec.io.inputs[i];
            if (!t.is_object() || !t.contains("name") || t["name"] != want.name || !t.contains("shape") || !t["shape"].is_array() ||
                t["shape"].size() != want.shape.size())
                fail(OF_ERR_MANIFEST, changed);
            std::vector<std::string> names;
            for (size_t k = 0; k < want.shape.size(); ++k) {
                const json& x = t["shape"][k];
                if (x.is_string() && want.shape[k] < 0) names.push_back(x.get<std::string>());
                else if (x.is_number_integer() && x.get<int64_t>() == want.shape[k]) names.emplace_back();
                else fail(OF_ERR_MANIFEST, changed);
            }
            out.input_dims.push_back(std::move(names));
        }
        return out;
    }
    fail(OF_ERR_MANIFEST, changed);
}

std::vector<int64_t> concrete(const StageSpec& spec, const StageDims& dims, size_t i, const std::map<std::string, int64_t>& sizes) {
    std::vector<int64_t> out;
    const TensorSpec& t = spec.io.inputs[i];
    for (size_t k = 0; k < t.shape.size(); ++k) {
        const std::string& name = dims.input_dims[i][k];
        if (name.empty()) {
            out.push_back(t.shape[k]);
            continue;
        }
        auto it = sizes.find(name);
        if (it == sizes.end())
            fail(OF_ERR_MANIFEST, "stage '" + spec.name + "' input '" + t.name + "' has the dim '" + name + "', which its dims do not describe");
        out.push_back(it->second);
    }
    return out;
}

StageSession open_stage(const std::shared_ptr<BuildImpl>& b, const std::string& name) {
    StageSession s;
    s.name = name;
    const Variant& v = b->manifest.served(name);
    const Contract& c = b->manifest.contract(name, v);
    for (const TensorSpec& t : c.inputs) {
        if (t.dtype != "float32")
            fail(OF_ERR_UNSUPPORTED, "stage '" + name + "' input '" + t.name + "' is " + t.dtype + "; the native core feeds its stages float32");
        s.inputs.push_back(t.name);
    }
    for (const TensorSpec& t : c.outputs) s.outputs.push_back(t.name);
    if (s.outputs.empty()) fail(OF_ERR_MANIFEST, "stage '" + name + "' declares no output");
    s.file = v.file;
    s.session = open_session(*b, v, read_graph(*b, v), /*spin=*/false);
    check_graph_io(s.session, c, "stage '" + name + "'", v.file);
    return s;
}

std::vector<float> run_stage(StageSession& s, const std::vector<std::pair<const float*, std::vector<int64_t>>>& feeds,
                             std::vector<int64_t>& out_shape, const std::string& output) {
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> values;
    std::vector<const char*> names;
    for (size_t i = 0; i < feeds.size(); ++i) {
        const auto& [data, shape] = feeds[i];
        values.push_back(Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(data), product(shape), shape.data(), shape.size()));
        names.push_back(s.inputs[i].c_str());
    }
    const char* out_name = output.empty() ? s.outputs[0].c_str() : output.c_str();
    std::vector<Ort::Value> out;
    try {
        out = s.session.Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), &out_name, 1);
    } catch (const Ort::Exception& e) {
        std::string why = e.what();
        fail(OF_ERR_ENGINE, "stage '" + s.name + "' failed: " + why.substr(0, why.find('\n')).substr(0, 300));
    }
    auto info = out[0].GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        fail(OF_ERR_ENGINE, "stage '" + s.name + "' output '" + out_name + "' is not float32");
    out_shape = info.GetShape();
    const float* p = out[0].GetTensorData<float>();
    return std::vector<float>(p, p + info.GetElementCount());
}

void check_media_modality(const std::string& modality, const std::string& what) {
    if (modality == "image" || modality == "video" || modality == "audio") return;
    std::string m = modality.substr(0, 60);
    for (char& ch : m)
        if (static_cast<unsigned char>(ch) < 0x20) ch = '?';
    fail(OF_ERR_INVALID_ARGUMENT, "unknown modality '" + m + "' (" + what + " image, video or audio)");
}

}  // namespace omniforge
