// The C boundary: every entry point catches everything and turns it into a status and a sentence.
#define ORT_API_MANUAL_INIT
#include <onnxruntime/onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <fstream>
#include <mutex>
#include <new>
#include <thread>
#include <tuple>
#include <unordered_map>

#include "image_frontend.hpp"
#include "internal.hpp"
#include "request.hpp"
#include "tokenizer.hpp"

namespace {

// A handle's last error, kept per calling thread: calls on one handle may come from several
// threads, and each reads the sentence of its own last call. A pointer to a thread's string stays
// valid until that thread's next call on the handle (unordered_map never moves its elements).
class Errors {
  public:
    std::string* mine() noexcept {
        try {
            std::lock_guard<std::mutex> lock(lock_);
            return &by_thread_[std::this_thread::get_id()];
        } catch (...) {
            return nullptr;  // no memory for a message: the status still says what happened
        }
    }
    const char* read() const noexcept {
        std::lock_guard<std::mutex> lock(lock_);
        auto it = by_thread_.find(std::this_thread::get_id());
        return it == by_thread_.end() ? "" : it->second.c_str();
    }

  private:
    mutable std::mutex lock_;
    std::unordered_map<std::thread::id, std::string> by_thread_;
};

}  // namespace

struct of_build {
    Errors errors;
    std::shared_ptr<omniforge::BuildImpl> impl;  // null when opening failed
};

struct of_llm {
    Errors errors;
    omniforge::LlmImpl* impl = nullptr;
};

struct of_tokenizer {
    Errors errors;
    std::shared_ptr<const omniforge::Tokenizer> impl;  // null when opening failed
};

struct of_generation {
    omniforge::GenerateOutput out;
};

namespace {

void set_error(std::string* where, const char* message) noexcept {
    if (!where) return;
    try {
        *where = message;
    } catch (...) {
        where->clear();  // no memory for the message: the status still says what happened
    }
}

std::string first_line(const char* s) {
    std::string t = s ? s : "";
    t = t.substr(0, t.find('\n'));
    return t.size() > 400 ? t.substr(0, 400) + "..." : t;
}

// Runs f; a thrown error becomes a status, and its sentence goes to *error.
template <class F>
of_status guarded(std::string* error, F&& f) noexcept {
    try {
        f();
        if (error) error->clear();
        return OF_OK;
    } catch (const omniforge::Error& e) {
        set_error(error, e.what());
        return e.status;
    } catch (const Ort::Exception& e) {
        set_error(error, ("ONNX Runtime failed: " + first_line(e.what())).c_str());
        return OF_ERR_ENGINE;
    } catch (const std::bad_alloc&) {
        set_error(error, "out of memory");
        return OF_ERR_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        set_error(error, ("internal error: " + first_line(e.what())).c_str());
        return OF_ERR_INTERNAL;
    } catch (...) {
        set_error(error, "internal error: an unknown exception");
        return OF_ERR_INTERNAL;
    }
}

}  // namespace

extern "C" {

void of_build_options_init(of_build_options* options) {
    if (!options) return;
    options->ort_library = nullptr;
    options->threads = 0;
    options->skip_verify = 0;
}

const char* of_status_name(of_status status) {
    switch (status) {
        case OF_OK: return "OF_OK";
        case OF_ERR_INVALID_ARGUMENT: return "OF_ERR_INVALID_ARGUMENT";
        case OF_ERR_MANIFEST: return "OF_ERR_MANIFEST";
        case OF_ERR_ENGINE: return "OF_ERR_ENGINE";
        case OF_ERR_INPUT: return "OF_ERR_INPUT";
        case OF_ERR_CONTEXT_LENGTH: return "OF_ERR_CONTEXT_LENGTH";
        case OF_ERR_OUT_OF_MEMORY: return "OF_ERR_OUT_OF_MEMORY";
        case OF_ERR_UNSUPPORTED: return "OF_ERR_UNSUPPORTED";
        case OF_ERR_INTERNAL: return "OF_ERR_INTERNAL";
        case OF_ERR_BUSY: return "OF_ERR_BUSY";
    }
    return "OF_ERR_UNKNOWN";
}

of_status of_build_open(const char* path, const of_build_options* options, of_build** build) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;  // nowhere to put a handle or a message
    *build = nullptr;
    of_build* h = new (std::nothrow) of_build();
    if (!h) return OF_ERR_OUT_OF_MEMORY;
    *build = h;
    return guarded(h->errors.mine(), [&] {
        if (!path) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the build path is a null pointer");
        if (!*path) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the build path is empty");
        of_build_options defaults;
        of_build_options_init(&defaults);
        h->impl = omniforge::open_build(path, options ? *options : defaults);
    });
}

void of_build_close(of_build* build) { delete build; }

const char* of_build_last_error(const of_build* build) {
    if (!build) return "the build handle is a null pointer";
    return build->errors.read();
}

of_status of_build_llm_geometry(of_build* build, int32_t* num_layers, int32_t* hidden_size, int32_t* vocab_size,
                                int32_t* max_context) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        const omniforge::StageSpec& s = build->impl->manifest.spec("llm");
        if (!s.has_llm) omniforge::fail(OF_ERR_MANIFEST, "the pipeline's stage 'llm' has no LLM geometry");
        if (num_layers) *num_layers = static_cast<int32_t>(s.llm.num_layers);
        if (hidden_size) *hidden_size = static_cast<int32_t>(s.llm.hidden_size);
        if (vocab_size) *vocab_size = static_cast<int32_t>(s.llm.vocab_size);
        if (max_context) *max_context = static_cast<int32_t>(s.llm.max_context);
    });
}

of_status of_llm_open(of_build* build, int32_t num_slots, int32_t max_context, of_llm** llm) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!llm) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the LLM handle's address is a null pointer");
        *llm = nullptr;
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        auto h = std::make_unique<of_llm>();
        h->impl = omniforge::open_llm(build->impl, num_slots, max_context);
        *llm = h.release();
    });
}

void of_llm_close(of_llm* llm) {
    if (!llm) return;
    omniforge::close_llm(llm->impl);
    delete llm;
}

const char* of_llm_last_error(const of_llm* llm) {
    if (!llm) return "the LLM handle is a null pointer";
    return llm->errors.read();
}

of_status of_llm_set_prefix_cache(of_llm* llm, int32_t entries, int32_t block_size) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] { omniforge::set_prefix_cache(*llm->impl, entries, block_size); });
}

const char* of_llm_signal_modality(const of_llm* llm, int32_t token_id) {
    if (!llm || !llm->impl) return nullptr;
    return omniforge::signal_modality(*llm->impl, token_id);
}

const char* of_llm_embedding_form(const of_llm* llm) {
    if (!llm || !llm->impl) return "";
    return omniforge::embedding_form(*llm->impl);
}

of_status of_llm_generate_greedy(of_llm* llm, const int32_t* prompt_ids, size_t n_prompt, int32_t max_new_tokens,
                                 int32_t eos_id, int32_t* out_ids, size_t out_capacity, size_t* out_n) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        if (out_n) *out_n = 0;
        if (!prompt_ids && n_prompt) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "prompt_ids is a null pointer");
        if (!out_ids) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "out_ids is a null pointer");
        if (!out_n) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "out_n is a null pointer");
        if (max_new_tokens < 1) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, got " + std::to_string(max_new_tokens));
        if (out_capacity < static_cast<size_t>(max_new_tokens))
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "out_ids holds " + std::to_string(out_capacity) + " ids, fewer than max_new_tokens (" +
                                                         std::to_string(max_new_tokens) + ")");
        std::vector<int32_t> out = omniforge::generate_greedy(*llm->impl, prompt_ids, n_prompt, max_new_tokens, eos_id);
        std::copy(out.begin(), out.end(), out_ids);
        *out_n = out.size();
    });
}

void of_generate_options_init(of_generate_options* o) {
    if (!o) return;
    *o = of_generate_options{};
    o->struct_size = sizeof(of_generate_options);
    o->max_new_tokens = 64;
    o->temperature = 0.0;
    o->top_k = 0;
    o->top_p = 1.0;
    o->repetition_penalty = 1.0;
    o->seed = 0;
    o->stop_token_ids = nullptr;
    o->n_stop_token_ids = -1;
    o->stop_strings = nullptr;
    o->n_stop_strings = 0;
    o->on_token = nullptr;
    o->user_data = nullptr;
    o->slot_wait_ms = 0;
    o->collect_signal_hidden = 0;
}

}  // extern "C"

namespace {

omniforge::DecodeParams decode_params_of(const of_decoder_options* options) {
    of_decoder_options o;
    of_decoder_options_init(&o);
    if (options) {
        if (options->struct_size != sizeof(of_decoder_options))
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the decoder options were not set up with of_decoder_options_init (struct_size is " +
                                                         std::to_string(options->struct_size) + ", this library's is " +
                                                         std::to_string(sizeof(of_decoder_options)) + ")");
        o = *options;
    }
    omniforge::DecodeParams p;
    p.steps = o.steps;
    p.guidance_scale = o.guidance_scale;
    p.scheduler = o.scheduler ? o.scheduler : "ddim";
    p.seed = o.seed;
    return p;
}

// "image,audio" -> its names (spaces around them dropped, empty ones skipped)
std::vector<std::string> split_names(const std::string& list) {
    std::vector<std::string> out;
    size_t at = 0;
    while (at <= list.size()) {
        size_t end = list.find(',', at);
        if (end == std::string::npos) end = list.size();
        std::string name = list.substr(at, end - at);
        name.erase(0, name.find_first_not_of(' '));
        name.erase(name.find_last_not_of(' ') + 1);
        if (!name.empty()) out.push_back(name);
        at = end + 1;
    }
    return out;
}

omniforge::GenerateParams params_of(const of_generate_options* options) {
    using omniforge::fail;
    of_generate_options o;
    of_generate_options_init(&o);
    if (options) {
        if (options->struct_size != sizeof(of_generate_options))
            fail(OF_ERR_INVALID_ARGUMENT, "the generate options were not set up with of_generate_options_init (struct_size is " +
                                              std::to_string(options->struct_size) + ", this library's is " +
                                              std::to_string(sizeof(of_generate_options)) + ")");
        o = *options;
    }
    omniforge::GenerateParams p;
    p.max_new_tokens = o.max_new_tokens;
    p.sampling.temperature = o.temperature;
    if (o.top_k < 0) fail(OF_ERR_INVALID_ARGUMENT, "top_k must be >= 0, got " + std::to_string(o.top_k));
    p.sampling.top_k = o.top_k;
    p.sampling.top_p = o.top_p;
    p.sampling.repetition_penalty = o.repetition_penalty;
    p.sampling.seed = o.seed;
    if (o.n_stop_token_ids < -1 || o.n_stop_token_ids > 65536)
        fail(OF_ERR_INVALID_ARGUMENT, "n_stop_token_ids must lie in [-1, 65536], got " + std::to_string(o.n_stop_token_ids));
    if (o.n_stop_token_ids > 0 && !o.stop_token_ids) fail(OF_ERR_INVALID_ARGUMENT, "stop_token_ids is a null pointer");
    p.default_stop = o.n_stop_token_ids < 0;
    if (o.n_stop_token_ids > 0) p.stop_ids.assign(o.stop_token_ids, o.stop_token_ids + o.n_stop_token_ids);
    if (o.n_stop_strings > 1024) fail(OF_ERR_INVALID_ARGUMENT, "at most 1024 stop strings, got " + std::to_string(o.n_stop_strings));
    if (o.n_stop_strings && !o.stop_strings) fail(OF_ERR_INVALID_ARGUMENT, "stop_strings is a null pointer");
    for (size_t i = 0; i < o.n_stop_strings; ++i) {
        if (!o.stop_strings[i]) fail(OF_ERR_INVALID_ARGUMENT, "stop string " + std::to_string(i) + " is a null pointer");
        p.stop_strings.emplace_back(o.stop_strings[i]);
    }
    p.callback = o.on_token;
    p.user_data = o.user_data;
    if (o.slot_wait_ms < -1) fail(OF_ERR_INVALID_ARGUMENT, "slot_wait_ms must be >= -1, got " + std::to_string(o.slot_wait_ms));
    p.slot_wait_ms = o.slot_wait_ms;
    p.collect_signal_hidden = o.collect_signal_hidden != 0;
    return p;
}

}  // namespace

extern "C" {

of_status of_llm_generate(of_llm* llm, const int32_t* prompt_ids, size_t n_prompt, const of_generate_options* options,
                          of_generation** result) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        if (!result) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the result's address is a null pointer");
        *result = nullptr;
        if (!prompt_ids && n_prompt) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "prompt_ids is a null pointer");
        omniforge::GenerateParams p = params_of(options);
        auto g = std::make_unique<of_generation>();
        g->out = omniforge::generate(*llm->impl, std::vector<int32_t>(prompt_ids, prompt_ids + n_prompt), p);
        *result = g.release();
    });
}

of_status of_llm_generate_embeddings(of_llm* llm, const float* rows, size_t n_rows, const int32_t* history_ids, size_t n_history,
                                     const of_generate_options* options, of_generation** result) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        using omniforge::fail;
        if (!result) fail(OF_ERR_INVALID_ARGUMENT, "the result's address is a null pointer");
        *result = nullptr;
        if (!rows && n_rows) fail(OF_ERR_INVALID_ARGUMENT, "rows is a null pointer");
        if (!history_ids && n_history) fail(OF_ERR_INVALID_ARGUMENT, "history_ids is a null pointer");
        int32_t hidden = 0, max_context = 0;
        omniforge::llm_geometry(*llm->impl, &hidden, &max_context);
        if (n_rows >= size_t(max_context))
            fail(OF_ERR_CONTEXT_LENGTH, "the prompt is " + std::to_string(n_rows) + " rows fed to the LLM; the context holds " +
                                            std::to_string(max_context) + ", leaving no room for a new token");
        if (n_history > (size_t(1) << 24)) fail(OF_ERR_INVALID_ARGUMENT, "n_history is implausibly large");
        omniforge::GenerateParams p = params_of(options);
        auto g = std::make_unique<of_generation>();
        g->out = omniforge::generate_rows(*llm->impl, std::vector<float>(rows, rows + n_rows * size_t(hidden)), n_rows,
                                          std::vector<int32_t>(history_ids, history_ids + n_history), p);
        *result = g.release();
    });
}

of_status of_llm_generate_media(of_llm* llm, const char* prompt, size_t prompt_len, const of_media_rows* media, size_t n_media,
                                const of_generate_options* options, of_generation** result) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        using omniforge::fail;
        if (!result) fail(OF_ERR_INVALID_ARGUMENT, "the result's address is a null pointer");
        *result = nullptr;
        if (!prompt && prompt_len) fail(OF_ERR_INVALID_ARGUMENT, "the prompt is a null pointer");
        if (!media && n_media) fail(OF_ERR_INVALID_ARGUMENT, "media is a null pointer");
        if (n_media > 1024) fail(OF_ERR_INVALID_ARGUMENT, "at most 1024 media items, got " + std::to_string(n_media));
        std::vector<omniforge::MediaItem> items;
        for (size_t i = 0; i < n_media; ++i) {
            if (!media[i].modality) fail(OF_ERR_INVALID_ARGUMENT, "media item " + std::to_string(i) + "'s modality is a null pointer");
            items.push_back({media[i].modality, media[i].rows, media[i].n_rows});
        }
        omniforge::GenerateParams p = params_of(options);
        omniforge::PreparedPrompt prepared =
            omniforge::prepare_prompt(*llm->impl, std::string(prompt ? prompt : "", prompt_len), items);
        if (p.stop_strings.empty()) p.stop_strings = prepared.stop_strings;  // Pipeline.run: the protocol's
        auto g = std::make_unique<of_generation>();
        g->out = omniforge::generate_rows(*llm->impl, prepared.rows, prepared.n, prepared.ids, p);
        *result = g.release();
    });
}

of_status of_llm_hidden_after(of_llm* llm, const float* rows, size_t n_rows, const int32_t* ids, size_t n_ids, float* hidden,
                              size_t n_floats) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        using omniforge::fail;
        if (!rows || !ids || !hidden) fail(OF_ERR_INVALID_ARGUMENT, "rows, ids or the hidden-state buffer is a null pointer");
        int32_t width = 0, max_context = 0;
        omniforge::llm_geometry(*llm->impl, &width, &max_context);
        if (n_rows > size_t(max_context) || n_ids > size_t(max_context))
            fail(OF_ERR_CONTEXT_LENGTH, std::to_string(n_rows) + " rows followed by " + std::to_string(n_ids) +
                                            " tokens do not fit the context of " + std::to_string(max_context));
        if (n_floats != n_ids * size_t(width))
            fail(OF_ERR_INVALID_ARGUMENT, "the hidden-state buffer must hold " + std::to_string(n_ids * size_t(width)) + " floats, got " +
                                              std::to_string(n_floats));
        const std::vector<float> r(rows, rows + n_rows * size_t(width));
        for (float x : r)
            if (!std::isfinite(x)) fail(OF_ERR_INPUT, "the rows contain NaN or Inf");
        const std::vector<float> out =
            omniforge::hidden_after(*llm->impl, r, n_rows, std::vector<int32_t>(ids, ids + n_ids), /*slot_wait_ms=*/-1);
        std::copy(out.begin(), out.end(), hidden);
    });
}

of_status of_llm_signal_hidden(of_llm* llm, const of_generation* g, const char* modality, float* hidden, size_t n_floats) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        using omniforge::fail;
        if (!g) fail(OF_ERR_INVALID_ARGUMENT, "the generation is a null pointer");
        if (!modality) fail(OF_ERR_INVALID_ARGUMENT, "the modality is a null pointer");
        if (!hidden) fail(OF_ERR_INVALID_ARGUMENT, "the hidden-state buffer is a null pointer");
        const std::vector<float> out = omniforge::signal_hidden(*llm->impl, g->out, modality, /*slot_wait_ms=*/-1);
        if (n_floats != out.size())
            fail(OF_ERR_INVALID_ARGUMENT, "the hidden-state buffer must hold " + std::to_string(out.size()) + " floats, got " +
                                              std::to_string(n_floats));
        std::copy(out.begin(), out.end(), hidden);
    });
}

of_status of_llm_embed_tokens(of_llm* llm, const int32_t* ids, size_t n, float* rows, size_t n_floats) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        using omniforge::fail;
        if (!ids && n) fail(OF_ERR_INVALID_ARGUMENT, "ids is a null pointer");
        if (!rows && n) fail(OF_ERR_INVALID_ARGUMENT, "rows is a null pointer");
        int32_t hidden = 0, max_context = 0;
        omniforge::llm_geometry(*llm->impl, &hidden, &max_context);
        if (n > (size_t(1) << 24)) fail(OF_ERR_INVALID_ARGUMENT, "n is implausibly large");
        if (n_floats != n * size_t(hidden))
            fail(OF_ERR_INVALID_ARGUMENT, "rows must hold " + std::to_string(n * size_t(hidden)) + " floats (" + std::to_string(n) + " x " +
                                              std::to_string(hidden) + "), got " + std::to_string(n_floats));
        const std::vector<float> out = omniforge::embed_tokens(*llm->impl, std::vector<int32_t>(ids, ids + n));
        std::copy(out.begin(), out.end(), rows);
    });
}

const int32_t* of_generation_tokens(const of_generation* g, size_t* n) {
    if (n) *n = g ? g->out.tokens.size() : 0;
    return g ? g->out.tokens.data() : nullptr;
}

const char* of_generation_text(const of_generation* g, size_t* len) {
    if (len) *len = g ? g->out.text.size() : 0;
    return g ? g->out.text.c_str() : "";
}

of_finish_reason of_generation_finish_reason(const of_generation* g) { return g ? g->out.finish : OF_FINISH_NONE; }
size_t of_generation_prompt_tokens(const of_generation* g) { return g ? g->out.prompt_tokens : 0; }
size_t of_generation_reused_tokens(const of_generation* g) { return g ? g->out.reused_tokens : 0; }
double of_generation_ttft_s(const of_generation* g) { return g ? g->out.ttft_s : 0.0; }
double of_generation_decode_s(const of_generation* g) { return g ? g->out.decode_s : 0.0; }
void of_generation_free(of_generation* g) { delete g; }

size_t of_generation_signal_count(const of_generation* g) { return g ? g->out.signals.size() : 0; }

of_status of_generation_signal(const of_generation* g, size_t i, const char** modality, const char** token, int32_t* token_id,
                               size_t* index) {
    if (!g || i >= g->out.signals.size()) return OF_ERR_INVALID_ARGUMENT;
    const omniforge::SignalEvent& e = g->out.signals[i];
    if (modality) *modality = e.modality.c_str();
    if (token) *token = e.token.c_str();
    if (token_id) *token_id = e.token_id;
    if (index) *index = e.index;
    return OF_OK;
}

of_status of_generation_signal_hidden(const of_generation* g, size_t i, const float** data, size_t* n) {
    if (!g || !data || !n || i >= g->out.signals.size()) return OF_ERR_INVALID_ARGUMENT;
    const bool has = i < g->out.signal_hidden.size() && !g->out.signal_hidden[i].empty();
    *data = has ? g->out.signal_hidden[i].data() : nullptr;
    *n = has ? g->out.signal_hidden[i].size() : 0;
    return OF_OK;
}

const char* of_finish_reason_name(of_finish_reason reason) {
    switch (reason) {
        case OF_FINISH_NONE: return "";
        case OF_FINISH_STOP: return "stop";
        case OF_FINISH_STOP_STRING: return "stop_string";
        case OF_FINISH_LENGTH: return "length";
        case OF_FINISH_CANCELLED: return "cancelled";
    }
    return "";
}

of_status of_llm_generate_text(of_llm* llm, const char* prompt, size_t prompt_len, const of_generate_options* options,
                               of_generation** result) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(llm->errors.mine(), [&] {
        if (!result) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the result's address is a null pointer");
        *result = nullptr;
        if (!prompt) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the prompt is a null pointer");
        omniforge::GenerateParams p = params_of(options);
        std::vector<int32_t> ids = omniforge::encode_prompt(*llm->impl, std::string(prompt, prompt_len));
        auto g = std::make_unique<of_generation>();
        g->out = omniforge::generate(*llm->impl, ids, p);
        *result = g.release();
    });
}

of_status of_tokenizer_open(const char* path, of_tokenizer** tokenizer) {
    if (!tokenizer) return OF_ERR_INVALID_ARGUMENT;
    *tokenizer = nullptr;
    of_tokenizer* h = new (std::nothrow) of_tokenizer();
    if (!h) return OF_ERR_OUT_OF_MEMORY;
    *tokenizer = h;
    return guarded(h->errors.mine(), [&] {
        if (!path) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the tokenizer path is a null pointer");
        std::ifstream f(path, std::ios::binary);
        if (!f) omniforge::fail(OF_ERR_INPUT, std::string("'") + path + "' cannot be read");
        f.seekg(0, std::ios::end);
        const std::streamoff size = f.tellg();
        if (size < 0 || size > (std::streamoff(256) << 20)) omniforge::fail(OF_ERR_INPUT, std::string("'") + path + "' is not a file of at most 256 MiB");
        f.seekg(0);
        std::string text(static_cast<size_t>(size), '\0');
        f.read(text.data(), size);
        std::string name = path;
        name = name.substr(name.find_last_of('/') + 1);
        h->impl = omniforge::Tokenizer::from_json(text, name);
    });
}

of_status of_build_tokenizer(of_build* build, of_tokenizer** tokenizer) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!tokenizer) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the tokenizer handle's address is a null pointer");
        *tokenizer = nullptr;
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        auto h = std::make_unique<of_tokenizer>();
        h->impl = omniforge::load_build_tokenizer(*build->impl).tok;
        *tokenizer = h.release();
    });
}

void of_tokenizer_close(of_tokenizer* tokenizer) { delete tokenizer; }

const char* of_tokenizer_last_error(const of_tokenizer* tokenizer) {
    if (!tokenizer) return "the tokenizer handle is a null pointer";
    return tokenizer->errors.read();
}

of_status of_tokenizer_encode(of_tokenizer* tokenizer, const char* text, size_t len, int add_special_tokens, int32_t* ids,
                              size_t capacity, size_t* n_ids) {
    if (!tokenizer) return OF_ERR_INVALID_ARGUMENT;
    return guarded(tokenizer->errors.mine(), [&] {
        if (!tokenizer->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this tokenizer handle failed to open and cannot be used");
        if (!n_ids) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "n_ids is a null pointer");
        *n_ids = 0;
        if (!text && len) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the text is a null pointer");
        std::vector<int32_t> out = tokenizer->impl->encode(std::string(text ? text : "", len), add_special_tokens != 0);
        *n_ids = out.size();
        if (!ids && capacity == 0) return;
        if (!ids) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "ids is a null pointer");
        if (capacity < out.size())
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "ids holds " + std::to_string(capacity) + " ids; the text needs " + std::to_string(out.size()));
        std::copy(out.begin(), out.end(), ids);
    });
}

of_status of_tokenizer_decode(of_tokenizer* tokenizer, const int32_t* ids, size_t n, int skip_special_tokens, char* text,
                              size_t capacity, size_t* len) {
    if (!tokenizer) return OF_ERR_INVALID_ARGUMENT;
    return guarded(tokenizer->errors.mine(), [&] {
        if (!tokenizer->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this tokenizer handle failed to open and cannot be used");
        if (!len) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "len is a null pointer");
        *len = 0;
        if (!ids && n) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "ids is a null pointer");
        std::string out = tokenizer->impl->decode(std::vector<int32_t>(ids, ids + n), skip_special_tokens != 0);
        *len = out.size();
        if (!text && capacity == 0) return;
        if (!text) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "text is a null pointer");
        if (capacity <= out.size())
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "text holds " + std::to_string(capacity) + " bytes; the decoded text needs " +
                                                         std::to_string(out.size() + 1) + " with its NUL");
        std::copy(out.begin(), out.end(), text);
        text[out.size()] = '\0';
    });
}

of_status of_tokenizer_token_to_id(of_tokenizer* tokenizer, const char* token, int32_t* id) {
    if (!tokenizer) return OF_ERR_INVALID_ARGUMENT;
    return guarded(tokenizer->errors.mine(), [&] {
        if (!tokenizer->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this tokenizer handle failed to open and cannot be used");
        if (!token || !id) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the token or the id's address is a null pointer");
        auto found = tokenizer->impl->token_to_id(token);
        if (!found) omniforge::fail(OF_ERR_INPUT, "the token is not in the vocabulary");
        *id = *found;
    });
}

size_t of_tokenizer_vocab_size(const of_tokenizer* tokenizer) {
    return tokenizer && tokenizer->impl ? tokenizer->impl->vocab_size() : 0;
}

}  // extern "C"

// ---- the diffusion decoders ----------------------------------------------------------------------

struct of_decoder {
    Errors errors;
    std::shared_ptr<omniforge::DecoderImpl> impl;
};

struct of_encoder {
    Errors errors;
    std::shared_ptr<omniforge::EncoderImpl> impl;
};

struct of_media {
    omniforge::MediaOut out;
};

namespace {

void shape_out(const std::vector<int64_t>& s, int64_t* shape, size_t capacity, size_t* rank) {
    if (!rank) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "rank is a null pointer");
    *rank = s.size();
    if (!shape && capacity == 0) return;
    if (!shape) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "shape is a null pointer");
    if (capacity < s.size())
        omniforge::fail(OF_ERR_INVALID_ARGUMENT, "shape holds " + std::to_string(capacity) + " sizes; the rank is " + std::to_string(s.size()));
    std::copy(s.begin(), s.end(), shape);
}

}  // namespace

extern "C" {

void of_decoder_options_init(of_decoder_options* o) {
    if (!o) return;
    *o = of_decoder_options{};
    o->struct_size = sizeof(of_decoder_options);
    o->steps = 20;
    o->guidance_scale = 7.5;
    o->scheduler = "ddim";
    o->seed = 0;
}

of_status of_decoder_open(of_build* build, const char* modality, of_decoder** decoder) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!decoder) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the decoder handle's address is a null pointer");
        *decoder = nullptr;
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        if (!modality) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the modality is a null pointer");
        auto h = std::make_unique<of_decoder>();
        h->impl = omniforge::open_decoder(build->impl, modality);
        *decoder = h.release();
    });
}

void of_decoder_close(of_decoder* decoder) { delete decoder; }

const char* of_decoder_last_error(const of_decoder* decoder) {
    if (!decoder) return "the decoder handle is a null pointer";
    return decoder->errors.read();
}

const char* of_decoder_modality(const of_decoder* decoder) {
    return decoder && decoder->impl ? omniforge::decoder_modality(*decoder->impl).c_str() : "";
}

of_status of_decoder_latent_shape(of_decoder* decoder, int64_t* shape, size_t capacity, size_t* rank) {
    if (!decoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(decoder->errors.mine(), [&] { shape_out(omniforge::decoder_latent_shape(*decoder->impl), shape, capacity, rank); });
}

of_status of_decoder_conditioning_shape(of_decoder* decoder, int64_t* shape, size_t capacity, size_t* rank) {
    if (!decoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(decoder->errors.mine(),
                   [&] { shape_out(omniforge::decoder_conditioning_shape(*decoder->impl), shape, capacity, rank); });
}

of_status of_decoder_run(of_decoder* decoder, const float* cond, size_t n_cond, const float* uncond, const float* initial_latents,
                         size_t n_latents, const of_decoder_options* options, of_media** result) {
    if (!decoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(decoder->errors.mine(), [&] {
        using omniforge::fail;
        if (!result) fail(OF_ERR_INVALID_ARGUMENT, "the result's address is a null pointer");
        *result = nullptr;
        const omniforge::DecodeParams p = decode_params_of(options);
        auto m = std::make_unique<of_media>();
        m->out = omniforge::decode(*decoder->impl, cond, n_cond, uncond, initial_latents, n_latents, p);
        *result = m.release();
    });
}

of_status of_decoder_conditioning(of_decoder* decoder, of_llm* llm, const float* hidden, size_t n_hidden, float* cond,
                                  size_t n_cond) {
    if (!decoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(decoder->errors.mine(), [&] {
        if (llm && !llm->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this LLM handle failed to open and cannot be used");
        omniforge::conditioning(*decoder->impl, llm ? llm->impl : nullptr, hidden, n_hidden, cond, n_cond);
    });
}

of_status of_decoder_conditioning_input(of_decoder* decoder, size_t* n_signal, size_t* hidden) {
    if (!decoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(decoder->errors.mine(), [&] {
        if (!n_signal || !hidden) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "n_signal or hidden is a null pointer");
        std::tie(*n_signal, *hidden) = omniforge::conditioning_input(*decoder->impl);
    });
}

// ---- media in ----------------------------------------------------------------------------------

of_status of_encoder_open(of_build* build, const char* modality, of_encoder** encoder) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!encoder) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the encoder handle's address is a null pointer");
        *encoder = nullptr;
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        if (!modality) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the modality is a null pointer");
        auto h = std::make_unique<of_encoder>();
        h->impl = omniforge::open_encoder(build->impl, modality);
        *encoder = h.release();
    });
}

void of_encoder_close(of_encoder* encoder) { delete encoder; }

const char* of_encoder_last_error(const of_encoder* encoder) {
    if (!encoder) return "the encoder handle is a null pointer";
    return encoder->errors.read();
}

const char* of_encoder_input_name(const of_encoder* encoder) {
    return encoder && encoder->impl ? omniforge::encoder_input_name(*encoder->impl).c_str() : "";
}

of_status of_encoder_input_shape(of_encoder* encoder, int64_t* shape, size_t capacity, size_t* rank) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] { shape_out(omniforge::encoder_input_shape(*encoder->impl), shape, capacity, rank); });
}

of_status of_encoder_rows(of_encoder* encoder, size_t* n_rows, size_t* width) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] {
        if (!n_rows || !width) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "n_rows or width is a null pointer");
        omniforge::encoder_rows(*encoder->impl, n_rows, width);
    });
}

of_status of_encoder_run(of_encoder* encoder, const float* input, size_t n_input, int64_t batch, float* rows, size_t n_floats) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] { omniforge::encode(*encoder->impl, input, n_input, batch, rows, n_floats); });
}

namespace {

omniforge::RgbView rgb_view(const of_image& im) {
    omniforge::RgbView v{im.pixels, im.width, im.height, im.stride};
    if (v.stride == 0 && v.width > 0) v.stride = size_t(v.width) * 3;
    return v;
}

}  // namespace

of_status of_encoder_image_input(of_encoder* encoder, const of_image* image, float* input, size_t n_floats) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] {
        if (!image) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the image is a null pointer");
        omniforge::image_input(*encoder->impl, rgb_view(*image), input, n_floats);
    });
}

of_status of_encoder_run_images(of_encoder* encoder, const of_image* images, size_t n_images, float* rows, size_t n_floats) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] {
        if (!images) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the images are a null pointer");
        if (n_images == 0 || n_images > 4096)
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "n_images must be in [1, 4096], got " + std::to_string(n_images));
        std::vector<omniforge::RgbView> views;
        for (size_t i = 0; i < n_images; ++i) views.push_back(rgb_view(images[i]));
        omniforge::encode_images(*encoder->impl, views.data(), views.size(), rows, n_floats);
    });
}

of_status of_encoder_video_frames(of_encoder* encoder, int64_t n_frames, double fps, int64_t* indices, size_t capacity, size_t* n) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] {
        if (!n) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "n is a null pointer");
        const std::vector<int64_t> at = omniforge::video_frames(*encoder->impl, n_frames, fps);
        *n = at.size();
        if (!indices && capacity == 0) return;
        if (!indices) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "indices is a null pointer");
        if (capacity < at.size())
            omniforge::fail(OF_ERR_INVALID_ARGUMENT, "indices holds " + std::to_string(capacity) + " values; the video needs " +
                                                         std::to_string(at.size()));
        std::copy(at.begin(), at.end(), indices);
    });
}

of_status of_encoder_audio_input(of_encoder* encoder, const float* samples, size_t n_samples, int32_t sample_rate, float* input,
                                 size_t n_floats, int64_t* batch) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(), [&] {
        omniforge::audio_input(*encoder->impl, samples, n_samples, sample_rate, input, n_floats, batch);
    });
}

of_status of_encoder_run_audio(of_encoder* encoder, const float* samples, size_t n_samples, int32_t sample_rate, float* rows,
                               size_t n_floats) {
    if (!encoder) return OF_ERR_INVALID_ARGUMENT;
    return guarded(encoder->errors.mine(),
                   [&] { omniforge::encode_audio(*encoder->impl, samples, n_samples, sample_rate, rows, n_floats); });
}

const float* of_media_data(const of_media* media, size_t* n) {
    if (n) *n = media ? media->out.data.size() : 0;
    return media ? media->out.data.data() : nullptr;
}

const int64_t* of_media_shape(const of_media* media, size_t* rank) {
    if (rank) *rank = media ? media->out.shape.size() : 0;
    return media ? media->out.shape.data() : nullptr;
}

const char* of_media_kind(const of_media* media) { return media ? media->out.kind.c_str() : ""; }
int32_t of_media_sample_rate(const of_media* media) { return media ? media->out.sample_rate : 0; }
double of_media_denoise_s(const of_media* media) { return media ? media->out.denoise_s : 0.0; }
double of_media_decode_s(const of_media* media) { return media ? media->out.decode_s : 0.0; }
void of_media_free(of_media* media) { delete media; }

// ---- the whole request in one call -------------------------------------------------------------

}  // extern "C"

struct of_pipeline {
    Errors errors;
    std::unique_ptr<omniforge::PipelineImpl> impl;
};

struct of_response {
    of_generation gen;
    std::vector<of_media> media;
};

extern "C" {

of_status of_pipeline_open(of_build* build, int32_t num_slots, int32_t max_context, of_pipeline** pipeline) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(build->errors.mine(), [&] {
        if (!pipeline) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "the pipeline handle's address is a null pointer");
        *pipeline = nullptr;
        if (!build->impl) omniforge::fail(OF_ERR_INVALID_ARGUMENT, "this build handle failed to open and cannot be used");
        auto h = std::make_unique<of_pipeline>();
        h->impl = std::make_unique<omniforge::PipelineImpl>(build->impl, num_slots, max_context);
        *pipeline = h.release();
    });
}

void of_pipeline_close(of_pipeline* pipeline) { delete pipeline; }

const char* of_pipeline_last_error(const of_pipeline* pipeline) {
    if (!pipeline) return "the pipeline handle is a null pointer";
    return pipeline->errors.read();
}

void of_request_init(of_request* request) {
    if (!request) return;
    *request = of_request{};
    request->struct_size = sizeof(of_request);
}

of_status of_pipeline_run(of_pipeline* pipeline, const of_request* request, const of_generate_options* generate,
                          const of_decoder_options* decode, of_response** response) {
    if (!pipeline) return OF_ERR_INVALID_ARGUMENT;
    return guarded(pipeline->errors.mine(), [&] {
        using omniforge::fail;
        if (!response) fail(OF_ERR_INVALID_ARGUMENT, "the response's address is a null pointer");
        *response = nullptr;
        if (!request) fail(OF_ERR_INVALID_ARGUMENT, "the request is a null pointer");
        if (request->struct_size != sizeof(of_request))
            fail(OF_ERR_INVALID_ARGUMENT, "the request was not set up with of_request_init (struct_size is " +
                                              std::to_string(request->struct_size) + ", this library's is " +
                                              std::to_string(sizeof(of_request)) + ")");
        const of_request& q = *request;
        if (!q.prompt && q.prompt_len) fail(OF_ERR_INVALID_ARGUMENT, "the prompt is a null pointer");
        if (!q.latents && q.n_latents) fail(OF_ERR_INVALID_ARGUMENT, "the latents are a null pointer");
        if (q.n_latents > 3) fail(OF_ERR_INVALID_ARGUMENT, "at most 3 latents (one per modality), got " + std::to_string(q.n_latents));
        if (q.video && (q.n_video_frames == 0 || q.n_video_frames > 4096))
            fail(OF_ERR_INVALID_ARGUMENT, "n_video_frames must be in [1, 4096], got " + std::to_string(q.n_video_frames));
        omniforge::RequestIn in;
        in.prompt.assign(q.prompt ? q.prompt : "", q.prompt_len);
        omniforge::RgbView image;
        if (q.image) {
            image = rgb_view(*q.image);
            in.image = &image;
        }
        in.audio = q.audio;
        in.n_audio = q.n_audio;
        in.audio_rate = q.audio_rate;
        std::vector<omniforge::RgbView> frames;
        if (q.video) {
            for (size_t i = 0; i < q.n_video_frames; ++i) frames.push_back(rgb_view(q.video[i]));
            in.frames = frames.data();
            in.n_frames = frames.size();
        }
        in.track = q.video_audio;
        in.n_track = q.n_video_audio;
        in.track_rate = q.video_audio_rate;
        for (const std::string& m : split_names(q.force ? q.force : "")) in.force.push_back(m);
        for (size_t i = 0; i < q.n_latents; ++i) {
            if (!q.latents[i].modality) fail(OF_ERR_INVALID_ARGUMENT, "latents " + std::to_string(i) + "'s modality is a null pointer");
            if (!in.latents.emplace(q.latents[i].modality, std::make_pair(q.latents[i].data, q.latents[i].n)).second)
                fail(OF_ERR_INVALID_ARGUMENT, std::string("latents are given twice for '") + q.latents[i].modality + "'");
        }
        omniforge::RequestOut out = omniforge::run_request(*pipeline->impl, in, params_of(generate), decode_params_of(decode));
        auto r = std::make_unique<of_response>();
        r->gen.out = std::move(out.gen);
        r->media.resize(out.media.size());
        for (size_t i = 0; i < out.media.size(); ++i) r->media[i].out = std::move(out.media[i]);
        *response = r.release();
    });
}

const of_generation* of_response_generation(const of_response* response) { return response ? &response->gen : nullptr; }
size_t of_response_media_count(const of_response* response) { return response ? response->media.size() : 0; }
const of_media* of_response_media(const of_response* response, size_t index) {
    return response && index < response->media.size() ? &response->media[index] : nullptr;
}
void of_response_free(of_response* response) { delete response; }

}  // extern "C"
