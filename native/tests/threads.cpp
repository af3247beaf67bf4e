// One loaded build shared by many threads: every thread runs several requests (greedy and seeded
// sampling) through one of_llm, each request with its own KV slot, and each result must equal the
// same request run alone. A thread's bad requests get their own errors while the others run.
// Then one image decoder, one video encoder (its front end from pixels) and one pipeline (whole
// requests) shared the same way: every thread's results equal the serial ones.
//   omniforge_threads BUILD [THREADS] [ROUNDS]
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "omniforge.h"

namespace {

struct Request {
    std::vector<int32_t> prompt;
    double temperature;
    int32_t top_k;
    double top_p;
    uint64_t seed;
};

std::vector<int32_t> run(of_llm* llm, const Request& r, int32_t wait_ms, of_status* status) {
    of_generate_options o;
    of_generate_options_init(&o);
    o.max_new_tokens = 24;
    o.n_stop_token_ids = 0;
    o.temperature = r.temperature;
    o.top_k = r.top_k;
    o.top_p = r.top_p;
    o.seed = r.seed;
    o.slot_wait_ms = wait_ms;
    of_generation* g = nullptr;
    *status = of_llm_generate(llm, r.prompt.data(), r.prompt.size(), &o, &g);
    std::vector<int32_t> out;
    if (*status == OF_OK) {
        size_t n = 0;
        const int32_t* t = of_generation_tokens(g, &n);
        out.assign(t, t + n);
    }
    of_generation_free(g);
    return out;
}

// A video's rows from the pixels of 2 frames, seeded by i; empty on failure.
std::vector<float> encode(of_encoder* e, int i, of_status* status) {
    size_t n_rows = 0, width = 0;
    *status = of_encoder_rows(e, &n_rows, &width);
    if (*status != OF_OK) return {};
    const int64_t w = 40 + i, h = 30 + 2 * i;
    std::vector<uint8_t> px(size_t(w * h) * 3 * 2);
    for (size_t k = 0; k < px.size(); ++k) px[k] = uint8_t((k * (7 + size_t(i)) + k / 13) % 256);
    const of_image frames[2] = {{px.data(), w, h, 0}, {px.data() + px.size() / 2, w, h, 0}};
    std::vector<float> rows(n_rows * width);
    *status = of_encoder_run_images(e, frames, 2, rows.data(), rows.size());
    return *status == OF_OK ? rows : std::vector<float>{};
}

// One whole request (an image in, the image forced out, 1 step): its tokens and the image's
// floats; empty on failure.
std::vector<float> request(of_pipeline* p, int i, of_status* status) {
    std::vector<uint8_t> px(size_t(30 + i) * 20 * 3);
    for (size_t k = 0; k < px.size(); ++k) px[k] = uint8_t((k * (3 + size_t(i))) % 256);
    const of_image img{px.data(), 30 + i, 20, 0};
    const std::string prompt = "Draw request " + std::to_string(i);
    of_request r;
    of_request_init(&r);
    r.prompt = prompt.data();
    r.prompt_len = prompt.size();
    r.image = &img;
    r.force = "image";
    of_generate_options go;
    of_generate_options_init(&go);
    go.max_new_tokens = 5;
    go.slot_wait_ms = -1;
    of_decoder_options dopt;
    of_decoder_options_init(&dopt);
    dopt.steps = 1;
    dopt.seed = uint64_t(i);
    of_response* resp = nullptr;
    *status = of_pipeline_run(p, &r, &go, &dopt, &resp);
    std::vector<float> out;
    if (*status == OF_OK) {
        size_t n = 0;
        const int32_t* t = of_generation_tokens(of_response_generation(resp), &n);
        for (size_t k = 0; k < n; ++k) out.push_back(float(t[k]));
        const float* d = of_media_data(of_response_media(resp, 0), &n);
        out.insert(out.end(), d, d + n);
    }
    of_response_free(resp);
    return out;
}

// `job(i, &status)` for each i < threads alone, then from `threads` threads at once (thread t runs
// `rounds` jobs i = (3t + r) % threads): every result must equal job i's alone. Adds the mismatches
// and errors to `failures`; false when a job alone fails.
template <class Job, class LastError>
bool shared(int threads, int rounds, const char* what, Job job, LastError last_error, int& failures) {
    std::vector<std::vector<float>> serial;
    for (int i = 0; i < threads; ++i) {
        of_status st = OF_OK;
        serial.push_back(job(i, &st));
        if (st != OF_OK) {
            std::fprintf(stderr, "%s, alone: %s\n", what, last_error());
            return false;
        }
    }
    std::atomic<int> mismatches{0}, errors{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            for (int r = 0; r < rounds; ++r) {
                of_status s = OF_OK;
                const int i = (t * 3 + r) % threads;
                if (job(i, &s) != serial[size_t(i)]) ++mismatches;
                if (s != OF_OK) ++errors;
            }
        });
    for (std::thread& th : pool) th.join();
    std::printf("%d threads x %d %s: %d mismatches, %d errors\n", threads, rounds, what, mismatches.load(), errors.load());
    failures += mismatches + errors;
    return true;
}

// One image decode (2 steps, seeded noise); empty on failure.
std::vector<float> decode(of_decoder* d, const std::vector<float>& cond, int i, of_status* status) {
    of_decoder_options o;
    of_decoder_options_init(&o);
    o.steps = 2;
    o.seed = uint64_t(500 + i);
    static const char* const names[] = {"ddim", "euler", "dpm"};
    o.scheduler = names[i % 3];
    of_media* m = nullptr;
    *status = of_decoder_run(d, cond.data(), cond.size(), nullptr, nullptr, 0, &o, &m);
    std::vector<float> out;
    if (*status == OF_OK) {
        size_t n = 0;
        const float* p = of_media_data(m, &n);
        out.assign(p, p + n);
    }
    of_media_free(m);
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s BUILD [THREADS] [ROUNDS]\n", argv[0]);
        return 2;
    }
    const int threads = argc > 2 ? std::atoi(argv[2]) : 8;
    const int rounds = argc > 3 ? std::atoi(argv[3]) : 3;
    of_build_options bo;
    of_build_options_init(&bo);
    bo.threads = 1;  // one intra-op thread per session: the requests are the parallelism
    of_build* build = nullptr;
    of_status st = of_build_open(argv[1], &bo, &build);
    if (st != OF_OK) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    int failures = 0;
    std::vector<Request> requests;
    for (int i = 0; i < threads * rounds; ++i) {
        Request r;
        for (int k = 0; k < 3 + (i % 7); ++k) r.prompt.push_back(1 + (i * 13 + k * 7) % 300);
        r.temperature = i % 3 == 0 ? 0.0 : 0.7 + 0.1 * (i % 4);
        r.top_k = i % 4 == 1 ? 20 : 0;
        r.top_p = i % 5 == 2 ? 0.85 : 1.0;
        r.seed = 1000 + i;
        requests.push_back(r);
    }
    // two pools: one slot per thread, and fewer slots than threads (requests wait for a slot)
    for (int slots : {threads, std::max(1, threads / 3)}) {
        of_llm* llm = nullptr;
        st = of_llm_open(build, slots, 0, &llm);
        if (st != OF_OK) {
            std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
            return 1;
        }
        std::vector<std::vector<int32_t>> serial;
        for (const Request& r : requests) {
            serial.push_back(run(llm, r, 0, &st));
            if (st != OF_OK) {
                std::fprintf(stderr, "serial request failed: %s\n", of_last_error(llm));
                return 1;
            }
        }
        std::atomic<int> mismatches{0}, errors{0};
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                for (int k = 0; k < rounds; ++k) {
                    const size_t i = size_t((t * rounds + k * 5) % (threads * rounds));
                    of_status s = OF_OK;
                    std::vector<int32_t> got = run(llm, requests[i], -1, &s);
                    if (s != OF_OK) {
                        std::fprintf(stderr, "thread %d: %s %s\n", t, of_status_name(s), of_last_error(llm));
                        ++errors;
                    } else if (got != serial[i]) {
                        ++mismatches;
                    }
                    if (t == 0) {  // a bad request: its error is this thread's, one sentence
                        int32_t bad = 1 << 30;
                        of_generation* g = nullptr;
                        s = of_llm_generate(llm, &bad, 1, nullptr, &g);
                        std::string e = of_last_error(llm);
                        if (s != OF_ERR_INPUT || e.find("token ids must lie in") == std::string::npos) ++errors;
                    } else if (std::string(of_last_error(llm)) != "") {
                        ++errors;  // another thread's error leaked into this one's
                    }
                }
            });
        }
        for (std::thread& th : pool) th.join();
        std::printf("%d threads x %d requests on %d slots: %d mismatches, %d errors\n", threads, rounds, slots, mismatches.load(),
                    errors.load());
        failures += mismatches + errors;
        // every slot is free again: a request that may not wait gets one
        of_status s = OF_OK;
        run(llm, requests[0], 0, &s);
        if (s != OF_OK) ++failures;
        of_llm_close(llm);
    }
    // one image decoder, many threads: each run has its own scheduler state and buffers
    of_decoder* dec = nullptr;
    st = of_decoder_open(build, "image", &dec);
    if (st == OF_OK) {
        int64_t shape[16];
        size_t rank = 0;
        size_t n_cond = 1;
        if (of_decoder_conditioning_shape(dec, shape, 16, &rank) != OF_OK) return 1;
        for (size_t k = 0; k < rank; ++k) n_cond *= size_t(shape[k]);
        std::vector<float> cond(n_cond);
        for (size_t k = 0; k < n_cond; ++k) cond[k] = float(k % 17) / 17.0f - 0.5f;
        std::vector<std::vector<float>> serial;
        for (int i = 0; i < threads; ++i) {
            serial.push_back(decode(dec, cond, i, &st));
            if (st != OF_OK) {
                std::fprintf(stderr, "serial decode failed: %s\n", of_last_error(dec));
                return 1;
            }
        }
        std::atomic<int> mismatches{0}, errors{0};
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                of_status s = OF_OK;
                const int i = (t * 5 + 3) % threads;
                if (decode(dec, cond, i, &s) != serial[size_t(i)]) ++mismatches;
                if (s != OF_OK) ++errors;
                if (t == 0) {  // a bad run: its error is this thread's
                    of_media* m = nullptr;
                    s = of_decoder_run(dec, cond.data(), cond.size() - 1, nullptr, nullptr, 0, nullptr, &m);
                    if (s != OF_ERR_INPUT || std::string(of_last_error(dec)).find("conditioning must hold") == std::string::npos) ++errors;
                } else if (std::string(of_last_error(dec)) != "") {
                    ++errors;
                }
            });
        }
        for (std::thread& th : pool) th.join();
        std::printf("%d threads x 1 image decode: %d mismatches, %d errors\n", threads, mismatches.load(), errors.load());
        failures += mismatches + errors;
        of_decoder_close(dec);
    } else if (st != OF_ERR_UNSUPPORTED) {  // a build without an image decoder has nothing to share
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        return 1;
    }
    // one video encoder, many threads: the image front end on each thread's frames, then the encoder
    of_encoder* enc = nullptr;
    st = of_encoder_open(build, "video", &enc);
    if (st == OF_OK) {
        auto job = [&](int i, of_status* s) { return encode(enc, i, s); };
        if (!shared(threads, 3, "video encodes from pixels", job, [&] { return of_last_error(enc); }, failures)) return 1;
        of_encoder_close(enc);
    } else if (st != OF_ERR_UNSUPPORTED) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        return 1;
    }
    // one pipeline, many threads: whole requests on 2 slots (a request waits for a free one)
    of_pipeline* pipe = nullptr;
    st = of_pipeline_open(build, 2, 0, &pipe);
    if (st != OF_OK) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        return 1;
    }
    auto job = [&](int i, of_status* s) { return request(pipe, i, s); };
    if (!shared(threads, 1, "whole request", job, [&] { return of_last_error(pipe); }, failures)) return 1;
    of_pipeline_close(pipe);
    of_build_close(build);
    if (failures) return 1;
    std::printf("all thread checks passed\n");
    return 0;
}
