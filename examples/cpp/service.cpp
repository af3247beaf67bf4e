// A starting point for a C++ service on libomniforge: load a build once, then serve requests that
// stream their text and can be cancelled, and report timing.
//
//   service BUILD "PROMPT" [--max N] [--cancel-after N] [--requests N] [--temperature T] [--seed S]
//
// --requests N runs N copies of the request on N threads against the one loaded LLM (each request
// takes its own KV slot). The first request's text streams to stdout; every request prints one
// summary line on stderr. ONNX Runtime's library comes from OMNIFORGE_ORT_LIBRARY.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "omniforge.h"

namespace {

// ---- a thin RAII layer over the C API -------------------------------------------------------

struct Failure : std::runtime_error {
    of_status status;
    Failure(of_status s, const std::string& what) : std::runtime_error(std::string(of_status_name(s)) + ": " + what), status(s) {}
};

struct BuildCloser {
    void operator()(of_build* b) const { of_build_close(b); }
};
struct LlmCloser {
    void operator()(of_llm* l) const { of_llm_close(l); }
};
struct GenerationFree {
    void operator()(of_generation* g) const { of_generation_free(g); }
};

class Model {
  public:
    // Verifies the build and opens its LLM with `slots` KV slots: at most that many requests run at
    // once; more wait for a free slot (slot_wait_ms below).
    Model(const std::string& folder, int slots) {
        of_build* b = nullptr;
        of_status st = of_build_open(folder.c_str(), nullptr, &b);
        build_.reset(b);
        if (st != OF_OK) throw Failure(st, of_last_error(b));
        of_llm* l = nullptr;
        st = of_llm_open(b, slots, 0, &l);
        if (st != OF_OK) throw Failure(st, of_last_error(b));
        llm_.reset(l);
    }

    struct Reply {
        std::string text;
        size_t tokens = 0;
        std::string finish;
        double ttft_s = 0, decode_s = 0;
    };

    // Generates a reply; on_piece gets each piece of text as it comes and returns false to cancel.
    // Safe to call from many threads at once.
    template <class OnPiece>
    Reply generate(const std::string& prompt, of_generate_options options, OnPiece on_piece) const {
        struct Ctx {
            OnPiece* on_piece;
        } ctx{&on_piece};
        options.on_token = [](void* user, int32_t, const char* text, size_t len) -> int {
            auto* c = static_cast<Ctx*>(user);
            return (*c->on_piece)(std::string(text, len)) ? 0 : 1;
        };
        options.user_data = &ctx;
        options.slot_wait_ms = -1;  // queue behind the other requests when every slot is busy
        of_generation* g = nullptr;
        of_status st = of_llm_generate_text(llm_.get(), prompt.data(), prompt.size(), &options, &g);
        std::unique_ptr<of_generation, GenerationFree> result(g);
        if (st != OF_OK) throw Failure(st, of_last_error(llm_.get()));
        Reply r;
        size_t len = 0;
        const char* text = of_generation_text(g, &len);
        r.text.assign(text, len);
        of_generation_tokens(g, &r.tokens);
        r.finish = of_finish_reason_name(of_generation_finish_reason(g));
        r.ttft_s = of_generation_ttft_s(g);
        r.decode_s = of_generation_decode_s(g);
        return r;
    }

  private:
    std::unique_ptr<of_build, BuildCloser> build_;
    std::unique_ptr<of_llm, LlmCloser> llm_;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s BUILD \"PROMPT\" [--max N] [--cancel-after N] [--requests N] [--temperature T] [--seed S]\n", argv[0]);
        return 2;
    }
    of_generate_options options;
    of_generate_options_init(&options);
    long cancel_after = -1;
    int requests = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        if (flag == "--max") options.max_new_tokens = std::atoi(argv[i + 1]);
        else if (flag == "--cancel-after") cancel_after = std::atol(argv[i + 1]);
        else if (flag == "--requests") requests = std::max(1, std::atoi(argv[i + 1]));
        else if (flag == "--temperature") options.temperature = std::strtod(argv[i + 1], nullptr);
        else if (flag == "--seed") options.seed = std::strtoull(argv[i + 1], nullptr, 10);
        else {
            std::fprintf(stderr, "unknown option %s\n", flag.c_str());
            return 2;
        }
    }
    try {
        const auto t0 = std::chrono::steady_clock::now();
        Model model(argv[1], requests);
        const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "loaded in %.3f s\n", load_s);

        std::vector<Model::Reply> replies(static_cast<size_t>(requests));
        std::vector<std::string> errors(static_cast<size_t>(requests));
        auto serve = [&](int k) {
            long pieces = 0;
            try {
                replies[size_t(k)] = model.generate(argv[2], options, [&](const std::string& piece) {
                    if (k == 0) {
                        std::fwrite(piece.data(), 1, piece.size(), stdout);
                        std::fflush(stdout);
                    }
                    ++pieces;  // one call per token
                    return cancel_after < 0 || pieces < cancel_after;
                });
            } catch (const Failure& e) {
                errors[size_t(k)] = e.what();
            }
        };
        std::vector<std::thread> threads;
        for (int k = 1; k < requests; ++k) threads.emplace_back(serve, k);
        serve(0);
        for (std::thread& t : threads) t.join();
        std::printf("\n");
        int failed = 0;
        for (int k = 0; k < requests; ++k) {
            const Model::Reply& r = replies[size_t(k)];
            if (!errors[size_t(k)].empty()) {
                std::fprintf(stderr, "request %d: %s\n", k, errors[size_t(k)].c_str());
                ++failed;
                continue;
            }
            const double rate = r.tokens > 1 && r.decode_s > 0 ? double(r.tokens - 1) / r.decode_s : 0.0;
            std::fprintf(stderr, "request %d: tokens=%zu finish=%s ttft_ms=%.2f decode_tok_s=%.1f\n", k, r.tokens, r.finish.c_str(),
                         r.ttft_s * 1e3, rate);
        }
        return failed ? 1 : 0;
    } catch (const Failure& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
