// The C boundary: every entry point catches everything and turns it into a status and a sentence.
#define ORT_API_MANUAL_INIT
#include <onnxruntime/onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <new>

#include "internal.hpp"

struct of_build {
    std::string error;
    std::shared_ptr<omniforge::BuildImpl> impl;  // null when opening failed
};

struct of_llm {
    std::string error;
    omniforge::LlmImpl* impl = nullptr;
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
    }
    return "OF_ERR_UNKNOWN";
}

of_status of_build_open(const char* path, const of_build_options* options, of_build** build) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;  // nowhere to put a handle or a message
    *build = nullptr;
    of_build* h = new (std::nothrow) of_build();
    if (!h) return OF_ERR_OUT_OF_MEMORY;
    *build = h;
    return guarded(&h->error, [&] {
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
    return build->error.c_str();
}

of_status of_build_llm_geometry(of_build* build, int32_t* num_layers, int32_t* hidden_size, int32_t* vocab_size,
                                int32_t* max_context) {
    if (!build) return OF_ERR_INVALID_ARGUMENT;
    return guarded(&build->error, [&] {
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
    return guarded(&build->error, [&] {
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
    return llm->error.c_str();
}

const char* of_llm_embedding_form(const of_llm* llm) {
    if (!llm || !llm->impl) return "";
    return omniforge::embedding_form(*llm->impl);
}

of_status of_llm_generate_greedy(of_llm* llm, const int32_t* prompt_ids, size_t n_prompt, int32_t max_new_tokens,
                                 int32_t eos_id, int32_t* out_ids, size_t out_capacity, size_t* out_n) {
    if (!llm) return OF_ERR_INVALID_ARGUMENT;
    return guarded(&llm->error, [&] {
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

}  // extern "C"
