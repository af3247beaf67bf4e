// ONNX Runtime loaded at run time, and the LLM: the in-place graph bound through its contract,
// the KV-cache pool, token embeddings and greedy decoding (as omniforge/runtime/llm.py does).
#define ORT_API_MANUAL_INIT
#include <onnxruntime/onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dirent.h>
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <cmath>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "internal.hpp"
#include "ort_session.hpp"
#include "tokenizer.hpp"

namespace omniforge {

// ---- ONNX Runtime ---------------------------------------------------------------------------

struct OrtLibrary {
    void* handle = nullptr;  // kept loaded for the life of the process (unloading ORT is unsafe)
    std::unique_ptr<Ort::Env> env;
};

namespace {

bool is_dir(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// The library file: `spec` itself, or libonnxruntime.so* in spec/capi or spec.
std::string find_library(const std::string& spec) {
    if (!is_dir(spec)) return spec;
    for (const std::string& dir : {spec + "/capi", spec}) {
        DIR* d = ::opendir(dir.c_str());
        if (!d) continue;
        std::string best;
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n.rfind("libonnxruntime.so", 0) == 0 && n > best) best = n;
        }
        ::closedir(d);
        if (!best.empty()) return dir + "/" + best;
    }
    fail(OF_ERR_ENGINE, "no libonnxruntime.so was found in '" + spec + "' or its capi/ folder");
}

std::shared_ptr<OrtLibrary> load_ort(const char* option) {
    const char* spec = option && *option ? option : std::getenv("OMNIFORGE_ORT_LIBRARY");
    if (!spec || !*spec)
        fail(OF_ERR_ENGINE,
             "ONNX Runtime's library was not given: set of_build_options.ort_library or OMNIFORGE_ORT_LIBRARY to "
             "libonnxruntime.so or to the onnxruntime Python package's folder");
    const std::string path = find_library(spec);
    auto lib = std::make_shared<OrtLibrary>();
    lib->handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib->handle) {
        const char* why = ::dlerror();
        fail(OF_ERR_ENGINE, "ONNX Runtime's library '" + path + "' could not be loaded (" + (why ? why : "unknown reason") + ")");
    }
    using GetApiBase = const OrtApiBase* (*)();
    auto get = reinterpret_cast<GetApiBase>(::dlsym(lib->handle, "OrtGetApiBase"));
    if (!get) fail(OF_ERR_ENGINE, "'" + path + "' is not ONNX Runtime's library (no OrtGetApiBase)");
    const OrtApiBase* base = get();
    const OrtApi* api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
    if (!api)
        fail(OF_ERR_ENGINE, std::string("ONNX Runtime ") + (base ? base->GetVersionString() : "?") + " at '" + path +
                                "' is older than the API version " + std::to_string(ORT_API_VERSION) +
                                " libomniforge was built against");
    Ort::InitApi(api);
    lib->env = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "omniforge");
    return lib;
}

const char* dtype_name(ONNXTensorElementDataType t) {
    switch (t) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
        default: return "another type";
    }
}

std::string shape_text(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
    return out + "]";
}

}  // namespace

// The graph's inputs and outputs are the contract's: names in order, dtypes, ranks, static sizes
// (check_graph_io in Python).
void check_graph_io(Ort::Session& session, const Contract& c, const std::string& what, const std::string& file) {
    Ort::AllocatorWithDefaultOptions alloc;
    for (int out = 0; out < 2; ++out) {
        const auto& want = out ? c.outputs : c.inputs;
        size_t n = out ? session.GetOutputCount() : session.GetInputCount();
        std::vector<std::string> names;
        for (size_t i = 0; i < n; ++i)
            names.push_back((out ? session.GetOutputNameAllocated(i, alloc) : session.GetInputNameAllocated(i, alloc)).get());
        bool same = names.size() == want.size();
        for (size_t i = 0; same && i < n; ++i) same = names[i] == want[i].name;
        if (!same)
            fail(OF_ERR_MANIFEST, "engine '" + file + "' has " + std::to_string(n) + " " + (out ? "outputs" : "inputs") +
                                      " that are not the ones " + what + " declares (names in order)");
        for (size_t i = 0; i < n; ++i) {
            Ort::TypeInfo ti = out ? session.GetOutputTypeInfo(i) : session.GetInputTypeInfo(i);
            if (ti.GetONNXType() != ONNX_TYPE_TENSOR)
                fail(OF_ERR_MANIFEST, "engine '" + file + "' " + (out ? "output '" : "input '") + names[i] + "' is not a tensor");
            auto info = ti.GetTensorTypeAndShapeInfo();
            std::string dtype = dtype_name(info.GetElementType());
            std::vector<int64_t> shape = info.GetShape();
            bool ok = dtype == want[i].dtype && shape.size() == want[i].shape.size();
            for (size_t k = 0; ok && k < shape.size(); ++k)
                ok = shape[k] < 0 || want[i].shape[k] < 0 || shape[k] == want[i].shape[k];
            if (!ok)
                fail(OF_ERR_MANIFEST, "engine '" + file + "' " + (out ? "output '" : "input '") + names[i] + "' is " + dtype + " " +
                                          shape_text(shape) + ", but " + what + " declares " + want[i].dtype + " " +
                                          shape_text(want[i].shape));
        }
    }
}

// A variant's graph, verified as it is read.
// Its external-data files must be among the variant's listed ones, and were verified (at open, or
// here when the open skipped the hashes): ONNX Runtime reads them from the graph's folder.
std::vector<char> read_graph(const BuildImpl& b, const Variant& v) {
    std::vector<char> data = read_verified(b.folder, b.manifest, v.file);
    std::vector<std::string> unlisted;
    for (const std::string& ref : external_data_refs(data, v.file))
        if (std::find(v.data_files.begin(), v.data_files.end(), ref) == v.data_files.end()) unlisted.push_back(ref);
    if (!unlisted.empty()) {
        std::string list;
        for (const std::string& u : unlisted) list += (list.empty() ? "'" : ", '") + u + "'";
        fail(OF_ERR_MANIFEST, "graph '" + v.file + "' reads external data [" + list + "] that the manifest does not list for it");
    }
    if (!b.verified)
        for (const std::string& f : v.data_files) verify_artifact(b.folder, b.manifest, f);
    return data;
}

Ort::Session open_session(const BuildImpl& b, const Variant& v, const std::vector<char>& data, bool spin) {
    Ort::SessionOptions opts;
    int threads = b.threads > 0 ? b.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    opts.SetIntraOpNumThreads(threads);
    opts.SetInterOpNumThreads(1);
    opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    opts.SetLogSeverityLevel(3);
    if (!spin) opts.AddConfigEntry("session.force_spinning_stop", "1");
    if (!v.data_files.empty()) {  // a graph from bytes finds its external data through this folder
        size_t slash = v.file.rfind('/');
        std::string dir = b.folder + (slash == std::string::npos ? "" : "/" + v.file.substr(0, slash));
        opts.AddConfigEntry("session.model_external_initializers_file_folder_path", dir.c_str());
    }
    try {
        return Ort::Session(*b.ort->env, data.data(), data.size(), opts);
    } catch (const Ort::Exception& e) {
        std::string why = e.what();
        why = why.substr(0, why.find('\n'));
        fail(OF_ERR_ENGINE, "ONNX Runtime could not load '" + v.file + "': " + why.substr(0, 300));
    }
}

BuildImpl::~BuildImpl() = default;

std::unique_ptr<BuildImpl> open_build(const std::string& folder, const of_build_options& options) {
    auto b = std::make_unique<BuildImpl>();
    b->folder = folder;
    while (b->folder.size() > 1 && b->folder.back() == '/') b->folder.pop_back();
    b->manifest = read_manifest(b->folder);
    verify_artifacts(b->folder, b->manifest, options.skip_verify != 0);
    b->verified = options.skip_verify == 0;
    if (options.threads < 0 || options.threads > 1024)
        fail(OF_ERR_INVALID_ARGUMENT, "threads must lie in [0, 1024], got " + std::to_string(options.threads));
    b->threads = options.threads;
    b->ort = load_ort(options.ort_library);
    return b;
}

// ---- the LLM --------------------------------------------------------------------------------

// A zero-filled float buffer whose pages cost memory only once written, as numpy.zeros: calloc
// maps fresh zero pages for large sizes, where a value-initialised vector writes every page. A KV
// pool then grows in memory as its slots fill, not all at once when the LLM opens.
class ZeroBuffer {
  public:
    explicit ZeroBuffer(size_t n) : p_(static_cast<float*>(std::calloc(n ? n : 1, sizeof(float)))) {
        if (!p_) throw std::bad_alloc();
    }
    ~ZeroBuffer() { std::free(p_); }
    ZeroBuffer(ZeroBuffer&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
    ZeroBuffer(const ZeroBuffer&) = delete;
    ZeroBuffer& operator=(const ZeroBuffer&) = delete;
    ZeroBuffer& operator=(ZeroBuffer&&) = delete;
    float* data() { return p_; }
    const float* data() const { return p_; }

  private:
    float* p_;
};

struct LlmImpl {
    std::shared_ptr<BuildImpl> build;  // keeps the build (and ORT) alive while the LLM is open
    LlmGeometry g;
    int64_t num_slots = 0, max_context = 0;
    Ort::Session session{nullptr};
    Contract contract;
    std::string embeds, seqlens, total, logits, hidden;
    std::vector<ZeroBuffer> kv;  // per in-place pair (layer-major, key then value): (slots, kvh, C, hd)
    std::vector<int64_t> lengths;       // valid tokens per slot
    std::vector<bool> busy;             // a request runs in the slot, or the prefix cache holds it
    std::mutex slots_lock;  // guards busy, the prefix cache, and lengths at the start and end of a request
    std::condition_variable slot_free;
    // the prefix cache: finished requests' slots, least recently used first, with the chained
    // digests of each whole block of the rows they fed (token and media rows are matched alike)
    struct CachedPrefix {
        int64_t slot;
        std::vector<std::string> blocks;
    };
    std::list<CachedPrefix> cached;
    std::atomic<int32_t> cache_entries{0};  // read without the lock to skip the work when off
    int32_t cache_block = 16;
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    // token embeddings: the served variant's table, else a session over it
    bool use_table = false;
    EmbeddingTable table;
    Ort::Session embed_session{nullptr};
    std::string embed_in, embed_out;
    bool embed_int64 = true;

    // the build's tokenizer, or why it cannot be read (text calls then fail with that sentence)
    std::optional<BuildTokenizer> tokenizer;
    of_status tokenizer_status = OF_OK;
    std::string tokenizer_error;
    std::vector<int32_t> hidden_ids;  // signal and placeholder tokens: never part of the visible text
    // signal token id -> (modality, the token as the tokenizer spells it), from the manifest's
    // pipeline.signal_tokens, as LlmRuntime.signal_ids
    std::map<int32_t, std::pair<std::string, std::string>> signal_ids;
    // which hidden state a signal token hands on: the one that predicted it (the protocol's
    // 'predicting', NExT-GPT's generation) or the one computed at it ('at_token', the default
    // without a protocol), as LlmRuntime.signal_position
    bool signal_predicting = false;
    std::optional<Protocol> protocol;  // the build's conversation protocol (protocol.json), if any

    std::vector<float> embed(const std::vector<int32_t>& ids);
    // Runs rows (S, H) for `slot`; fills last-position logits (V) and, when given, the last
    // row's final hidden state (H).
    void step(int64_t slot, const std::vector<float>& rows, int64_t s, std::vector<float>& logits_out,
              std::vector<float>* last_hidden = nullptr);
};

namespace {

using json = nlohmann::json;

// The build's protocol.json as PromptProtocol.from_dict reads it (its defaults: NExT-GPT's).
std::optional<Protocol> read_protocol(const BuildImpl& b) {
    auto it = b.manifest.files.find("protocol");
    if (it == b.manifest.files.end()) return std::nullopt;
    const std::string& rel = it->second;
    std::vector<char> data = read_verified(b.folder, b.manifest, rel);
    json d = json::parse(data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
    if (d.is_discarded() || !d.is_object()) fail(OF_ERR_MANIFEST, rel + " is not a JSON object");
    static const std::vector<std::string> kKnown = {"user_prefix",          "assistant_prefix", "media_open",      "media_close",
                                                    "bos_per_text_segment", "stop_strings",     "signal_position", "style"};
    for (const auto& [key, value] : d.items())
        if (std::find(kKnown.begin(), kKnown.end(), key) == kKnown.end()) fail(OF_ERR_MANIFEST, rel + ": protocol has unknown key '" + key + "'");
    Protocol p;
    auto text = [&](const char* key, std::string& out) {
        auto v = d.find(key);
        if (v == d.end()) return;
        if (!v->is_string() || v->get<std::string>().size() > 4 * kMaxProtocolText ||
            v->get<std::string>().find('\0') != std::string::npos)
            fail(OF_ERR_MANIFEST, rel + ": protocol " + key + " must be text of at most 256 characters");
        out = v->get<std::string>();
    };
    text("user_prefix", p.user_prefix);
    text("assistant_prefix", p.assistant_prefix);
    text("media_open", p.media_open);
    text("media_close", p.media_close);
    std::string style, position = "predicting";
    text("style", style);
    text("signal_position", position);
    if (position != "predicting" && position != "at_token")
        fail(OF_ERR_MANIFEST, rel + ": signal_position must be \"predicting\" or \"at_token\"");
    p.predicting = position == "predicting";
    if (auto v = d.find("bos_per_text_segment"); v != d.end()) {
        if (!v->is_boolean()) fail(OF_ERR_MANIFEST, rel + ": protocol bos_per_text_segment must be true or false");
        p.bos_per_text_segment = v->get<bool>();
    }
    if (auto v = d.find("stop_strings"); v != d.end()) {
        if (!v->is_array()) fail(OF_ERR_MANIFEST, rel + ": protocol stop_strings must be a list of non-empty strings");
        p.stop_strings.clear();
        for (const json& s : *v) {
            if (!s.is_string() || s.get<std::string>().empty() || s.get<std::string>().size() > 4 * kMaxProtocolText)
                fail(OF_ERR_MANIFEST, rel + ": protocol stop_strings must be a list of non-empty strings");
            p.stop_strings.push_back(s.get<std::string>());
        }
    }
    return p;
}

}  // namespace

LlmImpl* open_llm(std::shared_ptr<BuildImpl> build, int32_t num_slots, int32_t max_context) {
    auto llm = std::make_unique<LlmImpl>();
    const Manifest& m = build->manifest;
    const StageSpec& spec = m.spec("llm");
    if (!spec.has_llm) fail(OF_ERR_MANIFEST, "the pipeline's stage 'llm' has no LLM geometry");
    llm->g = spec.llm;
    const LlmGeometry& g = llm->g;
    if (num_slots < 1 || num_slots > 4096) fail(OF_ERR_INVALID_ARGUMENT, "num_slots must lie in [1, 4096], got " + std::to_string(num_slots));
    if (max_context < 0 || max_context > g.max_context)
        fail(OF_ERR_INVALID_ARGUMENT, "max context " + std::to_string(max_context) + " must lie in [1, " + std::to_string(g.max_context) +
                                          "] for this model (0: the model's)");
    llm->num_slots = num_slots;
    llm->max_context = max_context ? max_context : g.max_context;

    const Variant& v = m.variant("llm", "ort_inplace_llm");
    if (v.stage_contract) fail(OF_ERR_MANIFEST, "the 'ort_inplace_llm' variant of stage 'llm' carries no contract of its own");
    llm->contract = v.contract;
    const Contract& c = llm->contract;
    if (static_cast<int64_t>(c.inplace.size()) != 2 * g.num_layers)
        fail(OF_ERR_MANIFEST, "'" + v.file + "' binds " + std::to_string(c.inplace.size()) + " K/V buffers in place; a " +
                                  std::to_string(g.num_layers) + "-layer LLM needs " + std::to_string(2 * g.num_layers));
    llm->embeds = c.slot("embeds");
    llm->seqlens = c.slot("seqlens_k");
    llm->total = c.slot("total_sequence_length");
    llm->logits = c.slot("logits");
    llm->hidden = c.slot("hidden_states");
    auto find = [&](const std::vector<TensorSpec>& list, const std::string& name) -> const TensorSpec& {
        for (const TensorSpec& t : list)
            if (t.name == name) return t;
        fail(OF_ERR_MANIFEST, "the in-place LLM contract names '" + name + "' but does not declare it");
    };
    auto expect = [&](const TensorSpec& t, const char* dtype, std::vector<int64_t> shape) {
        bool ok = t.dtype == dtype && t.shape.size() == shape.size();
        for (size_t k = 0; ok && k < shape.size(); ++k) ok = t.shape[k] < 0 || shape[k] < 0 || t.shape[k] == shape[k];
        if (!ok)
            fail(OF_ERR_MANIFEST, "the in-place LLM contract declares '" + t.name + "' as " + t.dtype + " " + shape_text(t.shape) +
                                      "; libomniforge binds it as " + dtype + " " + shape_text(shape));
    };
    expect(find(c.inputs, llm->embeds), "float32", {-1, -1, g.hidden_size});
    expect(find(c.inputs, llm->seqlens), "int32", {-1});
    expect(find(c.inputs, llm->total), "int32", {});
    expect(find(c.outputs, llm->logits), "float32", {-1, 1, g.vocab_size});
    expect(find(c.outputs, llm->hidden), "float32", {-1, -1, g.hidden_size});
    for (const auto& [past, present] : c.inplace) {
        expect(find(c.inputs, past), "float32", {-1, g.num_kv_heads, -1, g.head_dim});
        expect(find(c.outputs, present), "float32", {-1, g.num_kv_heads, -1, g.head_dim});
    }

    const double need = 2.0 * g.num_layers * num_slots * g.num_kv_heads * double(llm->max_context) * g.head_dim * 4;
    const double phys = double(::sysconf(_SC_PAGE_SIZE)) * double(::sysconf(_SC_PHYS_PAGES));
    if (phys > 0 && need > phys)
        fail(OF_ERR_INVALID_ARGUMENT, "a KV cache of " + std::to_string(num_slots) + " slots x " + std::to_string(llm->max_context) +
                                          " tokens needs more than this machine's memory; use fewer slots or a shorter context");

    llm->session = open_session(*build, v, read_graph(*build, v), /*spin=*/true);
    check_graph_io(llm->session, c, "the in-place LLM contract", v.file);

    const size_t per = size_t(num_slots) * g.num_kv_heads * llm->max_context * g.head_dim;
    llm->kv.reserve(c.inplace.size());
    for (size_t i = 0; i < c.inplace.size(); ++i) llm->kv.emplace_back(per);
    llm->lengths.assign(num_slots, 0);
    llm->busy.assign(num_slots, false);

    // token embeddings: the stage's served variant, run as a session
    const Variant& ev = m.served("token_embedding");
    const Contract& ec = m.contract("token_embedding", ev);
    if (ec.inputs.size() != 1 || ec.outputs.empty() || ec.inputs[0].shape.size() != 2 ||
        (ec.inputs[0].dtype != "int64" && ec.inputs[0].dtype != "int32"))
        fail(OF_ERR_UNSUPPORTED, "the token_embedding stage does not take one (batch, seq) integer tensor of ids");
    expect(ec.outputs[0], "float32", {-1, -1, g.hidden_size});
    llm->embed_in = ec.inputs[0].name;
    llm->embed_out = ec.outputs[0].name;
    llm->embed_int64 = ec.inputs[0].dtype == "int64";
    std::vector<char> egraph = read_graph(*build, ev);
    llm->use_table = read_embedding_table(egraph, g.vocab_size, g.hidden_size, llm->table);
    if (!llm->use_table) {
        llm->embed_session = open_session(*build, ev, egraph, /*spin=*/false);
        check_graph_io(llm->embed_session, ec, "the token_embedding stage", ev.file);
    }
    try {
        llm->tokenizer = load_build_tokenizer(*build);
        for (const auto& list : {m.signal_tokens, m.placeholders})
            for (const auto& [modality, token] : list)
                if (auto id = llm->tokenizer->tok->token_to_id(token)) llm->hidden_ids.push_back(*id);
    } catch (const Error& e) {
        if (e.status == OF_ERR_MANIFEST) throw;  // a damaged file is refused, as every artifact is
        llm->tokenizer_status = e.status;
        llm->tokenizer_error = e.what();
    }
    if (llm->tokenizer) {
        // tokens the tokenizer does not know are no signal tokens (as the Python runtime). The
        // manifest's modalities are read in key order, not file order: a token listed under two
        // modalities would make the two runtimes disagree, so it is refused
        for (const auto& [modality, token] : m.signal_tokens) {
            const auto id = llm->tokenizer->tok->token_to_id(token);
            if (!id) continue;
            auto [it, fresh] = llm->signal_ids.try_emplace(*id, modality, llm->tokenizer->tok->id_to_token(*id).value_or(token));
            if (!fresh && it->second.first != modality)
                fail(OF_ERR_MANIFEST, "the signal token '" + token + "' is listed for both '" + it->second.first + "' and '" + modality +
                                          "' in the manifest's pipeline.signal_tokens");
        }
    }
    llm->protocol = read_protocol(*build);
    llm->signal_predicting = llm->protocol && llm->protocol->predicting;  // 'at_token' without a protocol
    llm->build = std::move(build);
    return llm.release();
}

void close_llm(LlmImpl* llm) { delete llm; }

void llm_geometry(const LlmImpl& llm, int32_t* hidden_size, int32_t* max_context) {
    *hidden_size = static_cast<int32_t>(llm.g.hidden_size);
    *max_context = static_cast<int32_t>(llm.max_context);
}

const BuildTokenizer* llm_tokenizer(const LlmImpl& llm) { return llm.tokenizer ? &*llm.tokenizer : nullptr; }
bool has_protocol(const LlmImpl& llm) { return llm.protocol.has_value(); }

of_status llm_tokenizer_error(const LlmImpl& llm, std::string* why) {
    if (why) *why = llm.tokenizer_error;
    return llm.tokenizer_status;
}

const char* signal_modality(const LlmImpl& llm, int32_t token_id) {
    auto it = llm.signal_ids.find(token_id);
    return it == llm.signal_ids.end() ? nullptr : it->second.first.c_str();
}

std::vector<int32_t> encode_prompt(LlmImpl& llm, const std::string& text) {
    if (!llm.tokenizer) fail(llm.tokenizer_status, llm.tokenizer_error);
    std::vector<int32_t> ids = encode_text(*llm.tokenizer, text, llm.max_context, /*special=*/true);
    if (ids.empty()) fail(OF_ERR_INPUT, "the prompt is empty");
    return ids;
}

namespace {

// LlmRuntime.check_fits
void check_fits(const LlmImpl& llm, size_t tokens, const std::string& what) {
    if (tokens >= size_t(llm.max_context))
        fail(OF_ERR_CONTEXT_LENGTH, what + " is " + std::to_string(tokens) + " tokens fed to the LLM; the context holds " +
                                        std::to_string(llm.max_context) + ", leaving no room for a new token");
}

// LlmRuntime._media_rows
void check_media_rows(const LlmImpl& llm, const MediaItem& item) {
    const std::string& m = item.modality;
    if (!item.rows || item.n_rows == 0)
        fail(OF_ERR_INPUT, m + " embeddings must have shape (n, " + std::to_string(llm.g.hidden_size) + ") with n >= 1, got " +
                               (item.rows ? "0 rows" : "a null pointer"));
    if (item.n_rows > size_t(llm.max_context))
        fail(OF_ERR_CONTEXT_LENGTH, m + " embeddings have " + std::to_string(item.n_rows) + " rows; the context holds " +
                                        std::to_string(llm.max_context));
    const size_t n = item.n_rows * size_t(llm.g.hidden_size);
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(item.rows[i])) fail(OF_ERR_INPUT, m + " embeddings contain NaN or Inf");
}

void append_rows(std::vector<float>& out, const MediaItem& item, int64_t hidden) {
    out.insert(out.end(), item.rows, item.rows + item.n_rows * size_t(hidden));
}

}  // namespace

PreparedPrompt prepare_prompt(LlmImpl& llm, std::string text, const std::vector<MediaItem>& items) {
    if (!llm.tokenizer) fail(llm.tokenizer_status, llm.tokenizer_error);
    const BuildTokenizer& tok = *llm.tokenizer;
    const Manifest& m = llm.build->manifest;
    const int64_t h = llm.g.hidden_size;
    for (const MediaItem& item : items) {
        if (item.modality != "image" && item.modality != "video" && item.modality != "audio")
            fail(OF_ERR_INPUT, "unknown modality '" + item.modality.substr(0, 60) + "' (media are image, video or audio)");
        check_media_rows(llm, item);
    }
    PreparedPrompt out;
    if (llm.protocol) {  // LlmRuntime.prepare_protocol over PromptProtocol.layout
        const Protocol& p = *llm.protocol;
        out.stop_strings = p.stop_strings;
        struct Part {
            std::string text;
            bool bos = false;
            const MediaItem* item = nullptr;
        };
        std::vector<Part> parts;
        auto rstrip = [](std::string s) {
            while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
            return s;
        };
        auto lstrip = [](const std::string& s) {
            size_t i = 0;
            while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
            return s.substr(i);
        };
        if (items.empty()) {
            parts.push_back({p.user_prefix + text + p.assistant_prefix, true});
        } else {
            parts.push_back({rstrip(p.user_prefix), true});
            for (const MediaItem& item : items) {
                parts.push_back({p.media_open, false});
                parts.push_back({"", false, &item});
                parts.push_back({p.media_close, false});
            }
            parts.push_back({lstrip(text) + p.assistant_prefix, p.bos_per_text_segment});
        }
        std::vector<std::vector<int32_t>> ids(parts.size());
        size_t total = 0;
        for (size_t i = 0; i < parts.size(); ++i) {
            if (parts[i].item) {
                total += parts[i].item->n_rows;
                continue;
            }
            if (parts[i].bos && tok.bos) ids[i].push_back(*tok.bos);
            std::vector<int32_t> t = encode_text(tok, parts[i].text, llm.max_context, /*special=*/false);
            ids[i].insert(ids[i].end(), t.begin(), t.end());
            total += ids[i].size();
        }
        check_fits(llm, total, items.empty() ? "the prompt" : "the prompt with its media");
        for (size_t i = 0; i < parts.size(); ++i) {
            if (parts[i].item) {
                append_rows(out.rows, *parts[i].item, h);
            } else if (!ids[i].empty()) {
                std::vector<float> r = llm.embed(ids[i]);
                out.rows.insert(out.rows.end(), r.begin(), r.end());
                out.ids.insert(out.ids.end(), ids[i].begin(), ids[i].end());
            }
        }
        out.n = total;
        if (total == 0) fail(OF_ERR_INPUT, "the prompt is empty");
        return out;
    }
    // Pipeline.run without a protocol: a medium whose placeholder the text lacks gets it in front
    // (image, audio, video in that order); LlmRuntime.prepare then splices the rows in at the
    // placeholders, items of a modality in order
    std::map<std::string, std::string> tags;
    for (const auto& [modality, token] : m.placeholders) tags[modality] = token;
    for (const char* modality : {"image", "audio", "video"}) {
        const bool given = std::any_of(items.begin(), items.end(), [&](const MediaItem& i) { return i.modality == modality; });
        if (!given) continue;
        auto it = tags.find(modality);
        if (it == tags.end()) {
            std::string known;
            for (const auto& [k, v] : tags) known += (known.empty() ? "'" : ", '") + k + "'";
            fail(OF_ERR_INPUT, "unknown modality '" + std::string(modality) + "' (this build takes: [" + known + "])");
        }
        if (text.find(it->second) == std::string::npos) text = it->second + " " + text;
    }
    out.ids = encode_text(tok, text, llm.max_context, /*special=*/true);
    if (out.ids.empty()) fail(OF_ERR_INPUT, "the prompt is empty");
    check_fits(llm, out.ids.size(), "the prompt");
    std::map<int32_t, std::string> placeholder_ids;
    for (const auto& [modality, token] : m.placeholders)
        if (auto id = tok.tok->token_to_id(token)) placeholder_ids[*id] = modality;
    std::map<std::string, std::vector<const MediaItem*>> queues;
    for (const MediaItem& item : items) queues[item.modality].push_back(&item);
    std::vector<std::pair<size_t, const MediaItem*>> plan;
    size_t fed = out.ids.size();
    for (size_t pos = 0; pos < out.ids.size(); ++pos) {
        auto pm = placeholder_ids.find(out.ids[pos]);
        if (pm == placeholder_ids.end()) continue;
        auto& q = queues[pm->second];
        if (q.empty()) continue;
        plan.emplace_back(pos, q.front());
        fed += q.front()->n_rows - 1;
        q.erase(q.begin());
    }
    std::string left;
    for (const auto& [modality, q] : queues)
        if (!q.empty()) left += (left.empty() ? "'" : ", '") + modality + "': " + std::to_string(q.size());
    if (!left.empty()) fail(OF_ERR_INPUT, "the prompt has fewer placeholders than media items: {" + left + "} left without a placeholder");
    if (!plan.empty()) check_fits(llm, fed, "the prompt with its media");
    const std::vector<float> rows = llm.embed(out.ids);
    size_t start = 0;
    for (const auto& [pos, item] : plan) {
        out.rows.insert(out.rows.end(), rows.begin() + long(start * size_t(h)), rows.begin() + long(pos * size_t(h)));
        append_rows(out.rows, *item, h);
        start = pos + 1;
    }
    out.rows.insert(out.rows.end(), rows.begin() + long(start * size_t(h)), rows.end());
    out.n = fed;
    return out;
}

const char* embedding_form(const LlmImpl& llm) {
    if (!llm.use_table) return "session";
    return llm.table.scale.empty() ? "table_fp32" : "table_int8";
}

std::vector<float> LlmImpl::embed(const std::vector<int32_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    if (use_table) {  // ids are checked against the vocabulary before they get here
        const size_t h = size_t(g.hidden_size);
        std::vector<float> rows(size_t(n) * h);
        for (int64_t i = 0; i < n; ++i) {
            float* dst = rows.data() + size_t(i) * h;
            if (table.scale.empty()) {
                const float* src = table.rows.data() + size_t(ids[i]) * h;
                std::copy(src, src + h, dst);
            } else {  // as the graph: Cast(int8 -> float) then Mul by the row's scale
                const int8_t* src = table.codes.data() + size_t(ids[i]) * h;
                const float s = table.scale[size_t(ids[i])];
                for (size_t k = 0; k < h; ++k) dst[k] = float(src[k]) * s;
            }
        }
        return rows;
    }
    std::vector<int64_t> shape{1, n};
    std::vector<int64_t> ids64(ids.begin(), ids.end());
    std::vector<int32_t> ids32(ids);
    Ort::Value in = embed_int64 ? Ort::Value::CreateTensor<int64_t>(cpu, ids64.data(), ids64.size(), shape.data(), 2)
                                : Ort::Value::CreateTensor<int32_t>(cpu, ids32.data(), ids32.size(), shape.data(), 2);
    std::vector<float> rows(size_t(n) * g.hidden_size);
    std::vector<int64_t> out_shape{1, n, g.hidden_size};
    Ort::Value out = Ort::Value::CreateTensor<float>(cpu, rows.data(), rows.size(), out_shape.data(), 3);
    const char* in_names[] = {embed_in.c_str()};
    const char* out_names[] = {embed_out.c_str()};
    embed_session.Run(Ort::RunOptions{nullptr}, in_names, &in, 1, out_names, &out, 1);
    return rows;
}

void LlmImpl::step(int64_t slot, const std::vector<float>& rows, int64_t s, std::vector<float>& logits_out,
                   std::vector<float>* last_hidden) {
    const int64_t before = lengths[slot], after = before + s;
    if (after > max_context)
        fail(OF_ERR_CONTEXT_LENGTH, "the sequence would reach " + std::to_string(after) + " tokens; the context holds " + std::to_string(max_context));
    Ort::IoBinding io(session);
    std::vector<float> rows_buf(rows);
    int64_t rows_shape[] = {1, s, g.hidden_size};
    int32_t seqlens_k = static_cast<int32_t>(after - 1);
    int64_t one[] = {1};
    int32_t total_len = static_cast<int32_t>(after);
    io.BindInput(embeds.c_str(), Ort::Value::CreateTensor<float>(cpu, rows_buf.data(), rows_buf.size(), rows_shape, 3));
    io.BindInput(seqlens.c_str(), Ort::Value::CreateTensor<int32_t>(cpu, &seqlens_k, 1, one, 1));
    io.BindInput(total.c_str(), Ort::Value::CreateTensor<int32_t>(cpu, &total_len, 1, nullptr, 0));
    logits_out.assign(size_t(g.vocab_size), 0.0f);
    int64_t logits_shape[] = {1, 1, g.vocab_size};
    std::vector<float> hidden_buf(size_t(s) * g.hidden_size);
    io.BindOutput(logits.c_str(), Ort::Value::CreateTensor<float>(cpu, logits_out.data(), logits_out.size(), logits_shape, 3));
    io.BindOutput(hidden.c_str(), Ort::Value::CreateTensor<float>(cpu, hidden_buf.data(), hidden_buf.size(), rows_shape, 3));
    const size_t per_slot = size_t(g.num_kv_heads) * max_context * g.head_dim;
    int64_t kv_shape[] = {1, g.num_kv_heads, max_context, g.head_dim};
    std::vector<Ort::Value> kv_values;
    kv_values.reserve(contract.inplace.size());
    for (size_t i = 0; i < contract.inplace.size(); ++i) {
        float* base = kv[i].data() + size_t(slot) * per_slot;
        kv_values.push_back(Ort::Value::CreateTensor<float>(cpu, base, per_slot, kv_shape, 4));
        io.BindInput(contract.inplace[i].first.c_str(), kv_values.back());
        io.BindOutput(contract.inplace[i].second.c_str(), kv_values.back());
    }
    try {
        session.Run(Ort::RunOptions{nullptr}, io);
    } catch (const Ort::Exception& e) {
        std::string why = e.what();
        fail(OF_ERR_ENGINE, "the LLM step failed: " + why.substr(0, why.find('\n')).substr(0, 300));
    }
    lengths[slot] = after;
    if (last_hidden) last_hidden->assign(hidden_buf.end() - g.hidden_size, hidden_buf.end());
}

namespace {

// One request's one-token step, bound once (as the Python runtime's decode buffers): a decode
// step then only writes the new row and the lengths in place, with no binding or allocation per
// token. `logits` must already hold vocab_size floats (the prefill step sized it); it stays bound.
class DecodeBinding {
  public:
    DecodeBinding(LlmImpl& llm, int64_t slot, std::vector<float>& logits)
        : llm_(llm), slot_(slot), io_(llm.session), row_(size_t(llm.g.hidden_size)), hidden_(size_t(llm.g.hidden_size)) {
        const LlmGeometry& g = llm.g;
        values_.reserve(5 + llm.contract.inplace.size());
        int64_t rows_shape[] = {1, 1, g.hidden_size};
        int64_t one[] = {1};
        int64_t logits_shape[] = {1, 1, g.vocab_size};
        bind_input(llm.embeds, Ort::Value::CreateTensor<float>(llm.cpu, row_.data(), row_.size(), rows_shape, 3));
        bind_input(llm.seqlens, Ort::Value::CreateTensor<int32_t>(llm.cpu, &seqlens_k_, 1, one, 1));
        bind_input(llm.total, Ort::Value::CreateTensor<int32_t>(llm.cpu, &total_len_, 1, nullptr, 0));
        values_.push_back(Ort::Value::CreateTensor<float>(llm.cpu, logits.data(), logits.size(), logits_shape, 3));
        io_.BindOutput(llm.logits.c_str(), values_.back());
        values_.push_back(Ort::Value::CreateTensor<float>(llm.cpu, hidden_.data(), hidden_.size(), rows_shape, 3));
        io_.BindOutput(llm.hidden.c_str(), values_.back());
        const size_t per_slot = size_t(g.num_kv_heads) * llm.max_context * g.head_dim;
        int64_t kv_shape[] = {1, g.num_kv_heads, llm.max_context, g.head_dim};
        for (size_t i = 0; i < llm.contract.inplace.size(); ++i) {
            float* base = llm.kv[i].data() + size_t(slot) * per_slot;
            values_.push_back(Ort::Value::CreateTensor<float>(llm.cpu, base, per_slot, kv_shape, 4));
            io_.BindInput(llm.contract.inplace[i].first.c_str(), values_.back());
            io_.BindOutput(llm.contract.inplace[i].second.c_str(), values_.back());
        }
    }

    // Feeds one row (hidden_size floats) to the slot; the logits land in the bound vector.
    void run(const std::vector<float>& row) {
        const int64_t after = llm_.lengths[slot_] + 1;
        if (after > llm_.max_context)
            fail(OF_ERR_CONTEXT_LENGTH, "the sequence would reach " + std::to_string(after) + " tokens; the context holds " +
                                            std::to_string(llm_.max_context));
        std::copy(row.begin(), row.end(), row_.begin());
        seqlens_k_ = static_cast<int32_t>(after - 1);
        total_len_ = static_cast<int32_t>(after);
        try {
            llm_.session.Run(Ort::RunOptions{nullptr}, io_);
        } catch (const Ort::Exception& e) {
            std::string why = e.what();
            fail(OF_ERR_ENGINE, "the LLM step failed: " + why.substr(0, why.find('\n')).substr(0, 300));
        }
        llm_.lengths[slot_] = after;
    }

    // The final hidden state of the row the last run fed.
    const std::vector<float>& hidden() const { return hidden_; }

  private:
    void bind_input(const std::string& name, Ort::Value value) {
        values_.push_back(std::move(value));
        io_.BindInput(name.c_str(), values_.back());
    }

    LlmImpl& llm_;
    int64_t slot_;
    Ort::IoBinding io_;
    std::vector<float> row_, hidden_;
    int32_t seqlens_k_ = 0, total_len_ = 0;
    std::vector<Ort::Value> values_;  // the bound tensors (views of the buffers above and the pool)
};

// Chained SHA-256 digests of each whole block of `block` rows among the first `n` rows (`width`
// floats each): equal digests mean equal prefixes, as the Python runtime's block_hashes.
std::vector<std::string> block_digests(const std::vector<float>& rows, size_t n, size_t block, size_t width) {
    std::vector<std::string> out;
    std::string chain;
    std::vector<unsigned char> buf;
    for (size_t b = 0; b + 1 <= n / block; ++b) {
        const auto* p = reinterpret_cast<const unsigned char*>(rows.data() + b * block * width);
        buf.assign(chain.begin(), chain.end());
        buf.insert(buf.end(), p, p + block * width * sizeof(float));
        chain = sha256_hex(buf.data(), buf.size());
        out.push_back(chain);
    }
    return out;
}

// A KV slot of the pool held for one request, released (and reset) when it goes out of scope.
struct SlotLease {
    LlmImpl& llm;
    int64_t slot = -1;
    bool adopted = false;  // the prefix cache keeps the slot: it is not freed at the end
    SlotLease(LlmImpl& l, int32_t wait_ms) : llm(l) {
        std::unique_lock<std::mutex> lock(llm.slots_lock);
        auto free_slot = [&] {
            for (int64_t i = 0; i < llm.num_slots; ++i)
                if (!llm.busy[size_t(i)]) return slot = i, true;
            if (!llm.cached.empty()) {  // the least recently used cached prefix gives its slot up
                slot = llm.cached.front().slot;
                llm.cached.pop_front();
                return true;
            }
            return false;
        };
        bool got = free_slot();
        if (!got && wait_ms < 0) {
            llm.slot_free.wait(lock, free_slot);
            got = true;
        } else if (!got && wait_ms > 0) {
            got = llm.slot_free.wait_for(lock, std::chrono::milliseconds(wait_ms), free_slot);
        }
        if (!got)
            fail(OF_ERR_BUSY, "the KV-cache pool has no free slot (" + std::to_string(llm.num_slots) + "/" +
                                  std::to_string(llm.num_slots) + " in use); retry later, wait with slot_wait_ms, or open the LLM with more slots");
        llm.busy[size_t(slot)] = true;
        llm.lengths[size_t(slot)] = 0;
    }

    // Copies the longest cached prefix of the prompt (whole blocks of its rows, leaving at least
    // one row to run) into this slot; returns its length. Under the lock: the source cannot be
    // evicted meanwhile.
    size_t reuse(const std::vector<float>& rows, size_t n) {
        const size_t block = cache_block();
        const size_t limit = llm.cache_entries > 0 ? (n - 1) / block : 0;
        if (limit == 0) return 0;
        // digested outside the lock; a block size changed meanwhile drops the entries, so none match
        const std::vector<std::string> wanted = block_digests(rows, limit * block, block, size_t(llm.g.hidden_size));
        std::lock_guard<std::mutex> lock(llm.slots_lock);
        if (size_t(llm.cache_block) != block) return 0;
        auto best = llm.cached.end();
        size_t best_n = 0;
        for (auto it = llm.cached.begin(); it != llm.cached.end(); ++it) {
            size_t k = 0;
            while (k < wanted.size() && k < it->blocks.size() && wanted[k] == it->blocks[k]) ++k;
            if (k > best_n) best = it, best_n = k;
        }
        if (best_n == 0) return 0;
        const size_t length = best_n * block;
        const LlmGeometry& g = llm.g;
        const size_t per_head = size_t(llm.max_context) * g.head_dim, per_slot = size_t(g.num_kv_heads) * per_head;
        for (auto& buffer : llm.kv) {
            const float* src = buffer.data() + size_t(best->slot) * per_slot;
            float* dst = buffer.data() + size_t(slot) * per_slot;
            for (int64_t h = 0; h < g.num_kv_heads; ++h)
                std::copy(src + h * per_head, src + h * per_head + length * g.head_dim, dst + h * per_head);
        }
        llm.cached.splice(llm.cached.end(), llm.cached, best);  // most recently used
        llm.lengths[size_t(slot)] = int64_t(length);
        return length;
    }

    // Hands the slot, whose cache holds the `n` rows `fed`, to the prefix cache (when it is on and
    // `fed` has a whole block), evicting the least recently used entry beyond its size.
    void adopt(const std::vector<float>& fed, size_t n) {
        const size_t block = cache_block();
        if (llm.cache_entries == 0 || n < block || fed.size() != n * size_t(llm.g.hidden_size)) return;
        std::vector<std::string> blocks = block_digests(fed, n, block, size_t(llm.g.hidden_size));
        {
            std::lock_guard<std::mutex> lock(llm.slots_lock);
            if (llm.cache_entries == 0 || size_t(llm.cache_block) != block || llm.lengths[size_t(slot)] != int64_t(n)) return;
            llm.cached.push_back({slot, std::move(blocks)});
            adopted = true;
            while (llm.cached.size() > size_t(llm.cache_entries)) {
                const int64_t old = llm.cached.front().slot;
                llm.cached.pop_front();
                llm.busy[size_t(old)] = false;
                llm.lengths[size_t(old)] = 0;
            }
        }
        llm.slot_free.notify_one();
    }

    size_t cache_block() {
        std::lock_guard<std::mutex> lock(llm.slots_lock);
        return size_t(llm.cache_block);
    }

    ~SlotLease() {
        if (adopted) return;
        {
            std::lock_guard<std::mutex> lock(llm.slots_lock);
            llm.busy[size_t(slot)] = false;
            llm.lengths[size_t(slot)] = 0;
        }
        llm.slot_free.notify_one();
    }
    SlotLease(const SlotLease&) = delete;
    SlotLease& operator=(const SlotLease&) = delete;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

std::vector<float> embed_tokens(LlmImpl& llm, const std::vector<int32_t>& ids) {
    const int64_t vocab = llm.g.vocab_size;
    for (int32_t id : ids)
        if (id < 0 || id >= vocab)
            fail(OF_ERR_INPUT, "token ids must lie in [0, " + std::to_string(vocab) + "), got " + std::to_string(id));
    return ids.empty() ? std::vector<float>() : llm.embed(ids);
}

std::vector<int32_t> signal_token_ids(const LlmImpl& llm, const std::string& modality) {
    std::vector<int32_t> ids;
    bool known = llm.tokenizer.has_value();
    for (const auto& [m, token] : llm.build->manifest.signal_tokens) {
        if (m != modality || !known) continue;
        const auto id = llm.tokenizer->tok->token_to_id(token);
        if (id) ids.push_back(*id);
        else known = false;
    }
    if (!known || ids.empty()) fail(OF_ERR_INPUT, "this build has no signal tokens for '" + modality + "'");
    return ids;
}

GenerateOutput generate(LlmImpl& llm, const std::vector<int32_t>& prompt, const GenerateParams& p) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t vocab = llm.g.vocab_size;
    if (prompt.empty()) fail(OF_ERR_INPUT, "the prompt is empty");
    if (prompt.size() >= static_cast<uint64_t>(llm.max_context))
        fail(OF_ERR_CONTEXT_LENGTH, "the prompt is " + std::to_string(prompt.size()) + " tokens fed to the LLM; the context holds " +
                                        std::to_string(llm.max_context) + ", leaving no room for a new token");
    auto lo_hi = std::minmax_element(prompt.begin(), prompt.end());
    if (*lo_hi.first < 0 || *lo_hi.second >= vocab)
        fail(OF_ERR_INPUT, "token ids must lie in [0, " + std::to_string(vocab) + "), got [" + std::to_string(*lo_hi.first) + ", " +
                               std::to_string(*lo_hi.second) + "]");
    return generate_rows(llm, llm.embed(prompt), prompt.size(), prompt, p, t0);
}

GenerateOutput generate_rows(LlmImpl& llm, const std::vector<float>& rows, size_t n, const std::vector<int32_t>& prompt,
                             const GenerateParams& p, std::chrono::steady_clock::time_point t0) {
    const int64_t ctx = llm.max_context, vocab = llm.g.vocab_size;
    const size_t width = size_t(llm.g.hidden_size);
    if (n == 0) fail(OF_ERR_INPUT, "the prompt is empty");
    if (rows.size() != n * width)
        fail(OF_ERR_INVALID_ARGUMENT, "the prompt rows hold " + std::to_string(rows.size()) + " floats, not " + std::to_string(n) + " x " +
                                          std::to_string(width));
    if (p.max_new_tokens < 1) fail(OF_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, got " + std::to_string(p.max_new_tokens));
    check_sampling(p.sampling);
    for (int32_t id : p.stop_ids)
        if (id < 0) fail(OF_ERR_INVALID_ARGUMENT, "a stop token id must be >= 0, got " + std::to_string(id));
    for (const std::string& s : p.stop_strings)
        if (s.empty()) fail(OF_ERR_INVALID_ARGUMENT, "a stop string must be non-empty text");
    if (!p.stop_strings.empty() && !llm.tokenizer)
        fail(llm.tokenizer_status, "stop strings need the build's tokenizer: " + llm.tokenizer_error);
    if (n >= static_cast<uint64_t>(ctx))
        fail(OF_ERR_CONTEXT_LENGTH, "the prompt is " + std::to_string(n) + " rows fed to the LLM; the context holds " + std::to_string(ctx) +
                                        ", leaving no room for a new token");
    for (int32_t id : prompt)  // the repetition penalty's history
        if (id < 0 || id >= vocab)
            fail(OF_ERR_INPUT, "token ids must lie in [0, " + std::to_string(vocab) + "), got " + std::to_string(id));
    for (float x : rows)
        if (!std::isfinite(x)) fail(OF_ERR_INPUT, "the prompt rows contain NaN or Inf");
    std::vector<int32_t> stop_ids = p.stop_ids;
    if (p.default_stop && llm.tokenizer && llm.tokenizer->eos) stop_ids.assign(1, *llm.tokenizer->eos);  // the model's EOS
    auto is_stop = [&](int32_t t) { return std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end(); };

    SlotLease lease(llm, p.slot_wait_ms);
    GenerateOutput out;
    out.prompt_tokens = n;
    if (p.collect_signal_hidden) {  // for signal_hidden's teacher-forced pass
        out.prompt_rows = rows;
        out.stop_ids = stop_ids;
    }
    Rng rng(p.sampling.seed);
    Sampler sampler;
    std::vector<int32_t> history;  // for the repetition penalty: the prompt's ids, then the generated
    if (p.sampling.repetition_penalty != 1.0) history = prompt;
    // the visible text, kept up to date per token when streamed or searched for stop strings
    std::optional<TextStream> text;
    const bool live_text = llm.tokenizer && (p.callback || !p.stop_strings.empty());
    if (llm.tokenizer) {
        std::vector<int32_t> hidden = llm.hidden_ids;
        hidden.insert(hidden.end(), stop_ids.begin(), stop_ids.end());
        text.emplace(*llm.tokenizer->tok, std::move(hidden), p.stop_strings);
    }
    std::vector<float> logits;
    out.reused_tokens = lease.reuse(rows, n);
    const std::vector<float> rest(rows.begin() + long(out.reused_tokens * width), rows.end());
    // the rows fed, kept for the prefix cache: the prompt's, then each generated token fed back
    const bool caching = llm.cache_entries > 0;  // read once: set_prefix_cache may run meanwhile
    std::vector<float> fed;
    if (caching) fed = rows;
    // the hidden states signal tokens hand on, by generated index (as the Python loop records them)
    const bool collect = p.collect_signal_hidden && !llm.signal_ids.empty();
    std::vector<float> predicting;  // the final hidden state of the row fed last
    std::map<size_t, std::vector<float>> kept;
    llm.step(lease.slot, rest, static_cast<int64_t>(n - out.reused_tokens), logits, collect ? &predicting : nullptr);
    std::optional<DecodeBinding> decode;  // bound at the first decode step
    std::chrono::steady_clock::time_point t_decode{};
    while (true) {
        const int32_t token = sampler.select(logits.data(), logits.size(), p.sampling, rng, history);
        out.tokens.push_back(token);
        if (collect && llm.signal_predicting && llm.signal_ids.count(token)) kept[out.tokens.size() - 1] = predicting;
        if (p.sampling.repetition_penalty != 1.0) history.push_back(token);
        if (out.tokens.size() == 1) {
            out.ttft_s = seconds_since(t0);
            t_decode = std::chrono::steady_clock::now();
        }
        if (is_stop(token)) out.finish = OF_FINISH_STOP;
        else if (static_cast<int64_t>(out.tokens.size()) >= p.max_new_tokens || static_cast<int64_t>(n + out.tokens.size()) > ctx)
            out.finish = OF_FINISH_LENGTH;
        std::string delta;
        if (live_text) {
            bool stopped = false;
            delta = text->push(token, out.finish != OF_FINISH_NONE, &stopped);
            if (stopped) out.finish = OF_FINISH_STOP_STRING;
        }
        if (p.callback && p.callback(p.user_data, token, delta.data(), delta.size()) != 0 && !out.finish)
            out.finish = OF_FINISH_CANCELLED;
        if (out.finish) break;
        if (!decode) decode.emplace(llm, lease.slot, logits);
        const std::vector<float> row = llm.embed({token});
        decode->run(row);
        if (caching) fed.insert(fed.end(), row.begin(), row.end());
        if (collect && llm.signal_predicting) predicting = decode->hidden();
        else if (collect && llm.signal_ids.count(token)) kept[out.tokens.size() - 1] = decode->hidden();
    }
    out.decode_s = seconds_since(t_decode);
    // 'at_token': a signal token generated last is fed once more for its hidden state, when it
    // did not stop the request and the context has room (its logits are not used)
    size_t fed_generated = out.tokens.size() - 1;
    if (collect && !llm.signal_predicting && llm.signal_ids.count(out.tokens.back()) && out.finish != OF_FINISH_STOP &&
        out.finish != OF_FINISH_CANCELLED && static_cast<int64_t>(n + out.tokens.size()) <= ctx) {
        if (!decode) decode.emplace(llm, lease.slot, logits);
        const std::vector<float> row = llm.embed({out.tokens.back()});
        decode->run(row);
        if (caching) fed.insert(fed.end(), row.begin(), row.end());
        kept[out.tokens.size() - 1] = decode->hidden();
        fed_generated = out.tokens.size();
    }
    if (caching) lease.adopt(fed, n + fed_generated);  // the prompt and the tokens fed back
    for (size_t i = 0; i < out.tokens.size(); ++i)  // as TextTokenizer.signal_events
        if (auto it = llm.signal_ids.find(out.tokens[i]); it != llm.signal_ids.end()) {
            out.signals.push_back({it->second.first, it->second.second, out.tokens[i], i});
            if (collect) {
                auto h = kept.find(i);
                out.signal_hidden.push_back(h == kept.end() ? std::vector<float>{} : std::move(h->second));
            }
        }
    if (text) {
        if (!live_text) {  // computed once, at the end
            text->finish(out.tokens);
        }
        out.text = text->text();
    }
    return out;
}

std::vector<float> hidden_after(LlmImpl& llm, const std::vector<float>& rows, size_t n, const std::vector<int32_t>& ids,
                                int32_t slot_wait_ms) {
    const size_t h = size_t(llm.g.hidden_size);
    if (n == 0 || rows.size() != n * h) fail(OF_ERR_INVALID_ARGUMENT, "the rows must be n >= 1 rows of hidden_size floats");
    if (ids.empty()) fail(OF_ERR_INVALID_ARGUMENT, "no token ids to feed after the rows");
    const size_t fed = n + ids.size() - (llm.signal_predicting ? 1 : 0);
    if (fed > size_t(llm.max_context))  // nothing is generated after them: they may fill it
        fail(OF_ERR_CONTEXT_LENGTH, std::to_string(n) + " rows followed by " + std::to_string(fed - n) + " tokens is " + std::to_string(fed) +
                                        " tokens fed to the LLM; the context holds " + std::to_string(llm.max_context));
    for (int32_t id : ids)
        if (id < 0 || id >= llm.g.vocab_size)
            fail(OF_ERR_INPUT, "token ids must lie in [0, " + std::to_string(llm.g.vocab_size) + "), got " + std::to_string(id));
    SlotLease lease(llm, slot_wait_ms);
    // a cached prefix is reused; at least the rows whose hidden states are read are computed anew
    const size_t reused = lease.reuse(rows, n);
    const std::vector<float> rest(rows.begin() + long(reused * h), rows.end());
    std::vector<float> logits, last, out;
    llm.step(lease.slot, rest, static_cast<int64_t>(n - reused), logits, &last);
    if (llm.signal_predicting) out = last;  // the row that predicts the first token
    DecodeBinding decode(llm, lease.slot, logits);
    for (size_t i = 0; i + (llm.signal_predicting ? 1 : 0) < ids.size(); ++i) {
        decode.run(llm.embed({ids[i]}));
        const std::vector<float> hs = decode.hidden();
        out.insert(out.end(), hs.begin(), hs.end());
    }
    return out;
}

std::vector<float> signal_hidden(LlmImpl& llm, const GenerateOutput& g, const std::string& modality, int32_t slot_wait_ms) {
    const std::vector<int32_t> ids = signal_token_ids(llm, modality);
    const size_t n = ids.size(), h = size_t(llm.g.hidden_size);
    // Pipeline._generated_signal_rows: the first complete, in-order run the LLM generated
    std::vector<size_t> at;
    std::vector<const std::vector<float>*> rows;
    for (size_t e = 0; e < g.signals.size(); ++e) {
        if (g.signals[e].modality != modality) continue;
        at.push_back(g.signals[e].index);
        if (e < g.signal_hidden.size() && !g.signal_hidden[e].empty()) rows.push_back(&g.signal_hidden[e]);
    }
    for (size_t k = 0; k < at.size(); ++k) {
        const size_t i = at[k];
        if (i + n <= g.tokens.size() && std::equal(ids.begin(), ids.end(), g.tokens.begin() + long(i)) && k + n <= rows.size()) {
            std::vector<float> out;
            for (size_t j = k; j < k + n; ++j) out.insert(out.end(), rows[j]->begin(), rows[j]->end());
            return out;
        }
    }
    // else Pipeline.run's forced modality: teacher-forced after the prompt and the generated text
    // (stop tokens left out, cut to what fits)
    if (g.prompt_rows.empty())
        fail(OF_ERR_INVALID_ARGUMENT, "this generation was made without collect_signal_hidden, so its prompt rows were not kept");
    const size_t n_prompt = g.prompt_rows.size() / h;
    std::vector<int32_t> text;
    for (int32_t t : g.tokens)
        if (std::find(g.stop_ids.begin(), g.stop_ids.end(), t) == g.stop_ids.end()) text.push_back(t);
    const int64_t room = std::max<int64_t>(0, llm.max_context - 1 - int64_t(n_prompt) - int64_t(n));
    if (int64_t(text.size()) > room) text.resize(size_t(room));
    std::vector<float> fed = g.prompt_rows;
    if (!text.empty()) {
        const std::vector<float> more = llm.embed(text);
        fed.insert(fed.end(), more.begin(), more.end());
    }
    return hidden_after(llm, fed, n_prompt + text.size(), ids, slot_wait_ms);
}

void set_prefix_cache(LlmImpl& llm, int32_t entries, int32_t block_size) {
    if (entries < 0 || entries >= llm.num_slots)
        fail(OF_ERR_INVALID_ARGUMENT, "the prefix cache must keep fewer entries than the pool's " + std::to_string(llm.num_slots) +
                                          " slots (0: off), got " + std::to_string(entries));
    if (block_size < 1 || block_size > 4096) fail(OF_ERR_INVALID_ARGUMENT, "block_size must lie in [1, 4096], got " + std::to_string(block_size));
    {
        std::lock_guard<std::mutex> lock(llm.slots_lock);
        const bool drop_all = block_size != llm.cache_block;  // entries keyed by other blocks
        llm.cache_entries = entries;
        llm.cache_block = block_size;
        while (!llm.cached.empty() && (drop_all || llm.cached.size() > size_t(entries))) {
            const int64_t old = llm.cached.front().slot;
            llm.cached.pop_front();
            llm.busy[size_t(old)] = false;
            llm.lengths[size_t(old)] = 0;
        }
    }
    llm.slot_free.notify_all();
}

std::vector<int32_t> generate_greedy(LlmImpl& llm, const int32_t* ids, size_t n, int32_t max_new_tokens, int32_t eos_id) {
    if (eos_id < -1) fail(OF_ERR_INVALID_ARGUMENT, "eos_id must be a token id or -1 (none), got " + std::to_string(eos_id));
    GenerateParams p;
    p.max_new_tokens = max_new_tokens;
    p.default_stop = false;
    if (eos_id >= 0) p.stop_ids.push_back(eos_id);
    p.slot_wait_ms = -1;  // a call waits for a free slot (calls may come from several threads)
    return generate(llm, std::vector<int32_t>(ids, ids + n), p).tokens;
}

}  // namespace omniforge
