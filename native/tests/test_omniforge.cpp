// Tests of libomniforge through its C API. Needs OMNIFORGE_TEST_BUILD (an omniforge build folder)
// and OMNIFORGE_ORT_LIBRARY (ONNX Runtime's library or the onnxruntime Python package's folder).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

#include "omniforge.h"

namespace fs = std::filesystem;

static int failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                              \
        }                                                                            \
    } while (0)

// A refusal: the expected status and one non-empty sentence (no newline) containing `part`.
static void expect_refusal(of_status got, of_status want, const char* message, const char* part, const char* what) {
    std::string m = message ? message : "";
    bool ok = got == want && !m.empty() && m.find('\n') == std::string::npos && m.find(part) != std::string::npos;
    std::printf("%-42s %-24s %s\n", what, of_status_name(got), m.c_str());
    if (!ok) {
        std::fprintf(stderr, "  expected %s with a sentence containing '%s'\n", of_status_name(want), part);
        ++failures;
    }
}

static std::string read_text(const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

static void write_text(const fs::path& p, const std::string& s) {
    fs::remove(p);  // a hard link or symlink is replaced, never written through
    std::ofstream f(p, std::ios::binary);
    f << s;
}

static void replace_once(std::string& s, const std::string& from, const std::string& to) {
    size_t at = s.find(from);
    if (at == std::string::npos) {
        std::fprintf(stderr, "the manifest holds no '%s' to replace\n", from.c_str());
        std::exit(1);
    }
    s.replace(at, from.size(), to);
}

// A copy of the build in tmp/name, changed by `edit`; the status and message of opening it.
static of_status open_copy(const fs::path& src, const fs::path& tmp, const char* name, const std::function<void(const fs::path&)>& edit,
                           std::string& message, const of_build_options* options = nullptr) {
    fs::path dst = tmp / name;
    fs::remove_all(dst);
    fs::copy(src, dst, fs::copy_options::recursive);
    edit(dst);
    of_build* b = nullptr;
    of_status st = of_build_open(dst.c_str(), options, &b);
    message = of_last_error(b);
    of_build_close(b);
    return st;
}

// ---- the diffusion decoders ----

// A decode's values and shape, or the status it failed with.
struct Decoded {
    of_status status = OF_OK;
    std::vector<float> data;
    std::vector<int64_t> shape;
    std::string kind;
    int32_t rate = 0;
};

static Decoded decode(of_decoder* d, const std::vector<float>& cond, const float* latents, size_t n_latents,
                      const of_decoder_options* o) {
    Decoded r;
    of_media* m = nullptr;
    r.status = of_decoder_run(d, cond.data(), cond.size(), nullptr, latents, n_latents, o, &m);
    if (r.status == OF_OK) {
        size_t n = 0, rank = 0;
        const float* p = of_media_data(m, &n);
        const int64_t* s = of_media_shape(m, &rank);
        r.data.assign(p, p + n);
        r.shape.assign(s, s + rank);
        r.kind = of_media_kind(m);
        r.rate = of_media_sample_rate(m);
        CHECK(of_media_denoise_s(m) > 0 && of_media_decode_s(m) > 0);
    } else {
        CHECK(m == nullptr);
    }
    of_media_free(m);
    return r;
}

static size_t product(const std::vector<int64_t>& s) {
    size_t n = 1;
    for (int64_t d : s) n *= size_t(d);
    return n;
}

static std::vector<int64_t> shape_of(of_decoder* d, bool latent) {
    int64_t buf[16];
    size_t rank = 0;
    CHECK((latent ? of_decoder_latent_shape(d, nullptr, 0, &rank) : of_decoder_conditioning_shape(d, nullptr, 0, &rank)) == OF_OK);
    CHECK(rank >= 2 && rank <= 16);
    CHECK((latent ? of_decoder_latent_shape(d, buf, 16, &rank) : of_decoder_conditioning_shape(d, buf, 16, &rank)) == OF_OK);
    return std::vector<int64_t>(buf, buf + rank);
}

static void check_decoders(const char* build_path) {
    of_decoder_options o;
    of_decoder_options_init(&o);
    CHECK(o.struct_size == sizeof o && o.steps == 20 && o.guidance_scale == 7.5 && std::string(o.scheduler) == "ddim" && o.seed == 0);
    CHECK(of_decoder_open(nullptr, "image", nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(std::strlen(of_decoder_last_error(nullptr)) > 0 && std::string(of_decoder_modality(nullptr)).empty());
    of_decoder_close(nullptr);
    of_media_free(nullptr);
    size_t n0 = 1;
    CHECK(of_media_data(nullptr, &n0) == nullptr && n0 == 0);
    of_build* b = nullptr;
    CHECK(of_build_open(build_path, nullptr, &b) == OF_OK);
    of_decoder* d = nullptr;
    of_status st = of_decoder_open(b, "image", nullptr);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "null pointer", "a null decoder address");
    st = of_decoder_open(b, nullptr, &d);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "null pointer", "a null modality");
    st = of_decoder_open(b, "text", &d);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "unknown modality 'text'", "a modality without a decoder");
    CHECK(d == nullptr);

    // the image decoder: shapes, a run from given latents, seeded runs, refusals
    st = of_decoder_open(b, "image", &d);
    if (st != OF_OK) {
        std::fprintf(stderr, "the image decoder did not open: %s %s\n", of_status_name(st), of_last_error(b));
        ++failures;
        of_build_close(b);
        return;
    }
    CHECK(std::string(of_decoder_modality(d)) == "image");
    const std::vector<int64_t> ls = shape_of(d, true), cs = shape_of(d, false);
    CHECK(ls.size() == 4 && ls[0] == 1 && cs[0] == 1);
    int64_t small[2];
    size_t rank = 0;
    st = of_decoder_latent_shape(d, small, 2, &rank);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(d), "the rank is 4", "a shape buffer too small");
    std::vector<float> cond(product(cs)), lat(product(ls));
    for (size_t i = 0; i < cond.size(); ++i) cond[i] = float(std::sin(0.37 * double(i)));
    for (size_t i = 0; i < lat.size(); ++i) lat[i] = float(std::cos(0.91 * double(i)) * 1.3);
    o.steps = 2;
    Decoded img = decode(d, cond, lat.data(), lat.size(), &o);
    CHECK(img.status == OF_OK && img.kind == "image" && img.rate == 0);
    CHECK(img.shape.size() == 3 && img.shape[2] == 3 && img.data.size() == product(img.shape));
    bool in_range = true;
    for (float v : img.data) in_range = in_range && v >= 0.0f && v <= 1.0f;
    CHECK(in_range);
    CHECK(decode(d, cond, lat.data(), lat.size(), &o).data == img.data);  // a run's state is its own
    o.seed = 7;
    Decoded s7 = decode(d, cond, nullptr, 0, &o), s7b = decode(d, cond, nullptr, 0, &o);
    o.seed = 8;
    Decoded s8 = decode(d, cond, nullptr, 0, &o);
    CHECK(s7.status == OF_OK && s7.data == s7b.data && s8.status == OF_OK && s8.data != s7.data);
    for (const char* name : {"euler", "dpm"}) {
        o.scheduler = name;
        Decoded r = decode(d, cond, lat.data(), lat.size(), &o);
        CHECK(r.status == OF_OK && r.shape == img.shape);
    }
    o.scheduler = "ddim";
    o.guidance_scale = 1.0;  // no guidance: the conditional input alone
    CHECK(decode(d, cond, lat.data(), lat.size(), &o).status == OF_OK);

    auto refused = [&](const std::function<void(of_decoder_options&, std::vector<float>&, size_t&)>& edit, of_status want,
                       const char* part, const char* what) {
        of_decoder_options bad;
        of_decoder_options_init(&bad);
        bad.steps = 2;
        std::vector<float> c = cond;
        size_t nl = lat.size();
        edit(bad, c, nl);
        of_media* m = reinterpret_cast<of_media*>(&bad);  // must be reset to NULL
        of_status s = of_decoder_run(d, c.data(), c.size(), nullptr, lat.data(), nl, &bad, &m);
        expect_refusal(s, want, of_last_error(d), part, what);
        CHECK(m == nullptr);
    };
    using Opt = of_decoder_options;
    using Vec = std::vector<float>;
    refused([](Opt& x, Vec&, size_t&) { x.struct_size = 1; }, OF_ERR_INVALID_ARGUMENT, "of_decoder_options_init", "decoder options not initialised");
    refused([](Opt& x, Vec&, size_t&) { x.steps = 0; }, OF_ERR_INVALID_ARGUMENT, "steps must be >= 1, got 0", "zero steps");
    refused([](Opt& x, Vec&, size_t&) { x.steps = 100000; }, OF_ERR_INVALID_ARGUMENT, "steps must lie in [1, ", "too many steps");
    refused([](Opt& x, Vec&, size_t&) { x.scheduler = "heun"; }, OF_ERR_INVALID_ARGUMENT, "unknown scheduler 'heun' (choose from ddim, euler, dpm)", "an unknown scheduler");
    refused([](Opt& x, Vec&, size_t&) { x.guidance_scale = -1; }, OF_ERR_INVALID_ARGUMENT, "guidance scale must be >= 0", "a negative guidance scale");
    refused([](Opt& x, Vec&, size_t&) { x.guidance_scale = NAN; }, OF_ERR_INVALID_ARGUMENT, "got nan", "a NaN guidance scale");
    refused([](Opt&, Vec& c, size_t&) { c.pop_back(); }, OF_ERR_INPUT, "conditioning must hold", "a conditioning too short");
    refused([](Opt&, Vec& c, size_t&) { c[3] = NAN; }, OF_ERR_INPUT, "NaN or infinite", "a NaN in the conditioning");
    refused([](Opt&, Vec&, size_t& nl) { nl -= 1; }, OF_ERR_INPUT, "latents must have shape", "latents of the wrong size");
    of_media* m = nullptr;
    st = of_decoder_run(d, cond.data(), cond.size(), nullptr, nullptr, 5, &o, &m);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(d), "null pointer", "a latent count without latents");
    st = of_decoder_run(d, nullptr, cond.size(), nullptr, nullptr, 0, &o, &m);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(d), "null pointer", "a null conditioning");
    st = of_decoder_run(d, cond.data(), cond.size(), nullptr, nullptr, 0, &o, nullptr);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(d), "null pointer", "a null media address");
    // the decoder outlives its build handle, and works after refusals
    of_build_close(b);
    CHECK(decode(d, cond, lat.data(), lat.size(), &o).status == OF_OK);
    CHECK(std::string(of_last_error(d)).empty());
    of_decoder_close(d);

    // video frames and an audio waveform
    CHECK(of_build_open(build_path, nullptr, &b) == OF_OK);
    for (const char* modality : {"video", "audio"}) {
        d = nullptr;
        st = of_decoder_open(b, modality, &d);
        if (st != OF_OK) {
            std::fprintf(stderr, "the %s decoder did not open: %s %s\n", modality, of_status_name(st), of_last_error(b));
            ++failures;
            continue;
        }
        std::vector<float> c(product(shape_of(d, false)), 0.25f);
        of_decoder_options_init(&o);
        o.steps = 2;
        o.scheduler = "dpm";
        Decoded r = decode(d, c, nullptr, 0, &o);
        CHECK(r.status == OF_OK && r.kind == modality);
        if (std::string(modality) == "video") CHECK(r.shape.size() == 4 && r.shape[3] == 3);
        else CHECK(r.shape.size() == 1 && r.shape[0] > 0 && r.rate >= 1000);
        of_decoder_close(d);
    }
    of_build_close(b);
}

// ---- media in, and the conditioning out ----

// The audio front end from samples (22.05 kHz, resampled): its batch through of_encoder_run gives
// the same rows as of_encoder_run_audio; bad samples are refused.
static void check_samples_in(of_encoder* e, size_t item, std::vector<float>& rows, std::vector<float>& want) {
    std::vector<float> tone(22050);
    for (size_t i = 0; i < tone.size(); ++i) tone[i] = 0.3f * std::sin(float(i) * 0.06f) + 0.1f * std::sin(float(i) * 0.9f);
    int64_t batch = 0;
    CHECK(of_encoder_audio_input(e, tone.data(), tone.size(), 22050, nullptr, 0, &batch) == OF_OK && batch >= 1);
    std::vector<float> x(item * size_t(batch));
    CHECK(of_encoder_audio_input(e, tone.data(), tone.size(), 22050, x.data(), x.size(), &batch) == OF_OK);
    CHECK(std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); }));
    CHECK(of_encoder_run_audio(e, tone.data(), tone.size(), 22050, rows.data(), rows.size()) == OF_OK);
    CHECK(of_encoder_run(e, x.data(), x.size(), batch, want.data(), want.size()) == OF_OK);
    CHECK(rows == want);
    tone[5] = INFINITY;
    of_status st = of_encoder_run_audio(e, tone.data(), tone.size(), 22050, rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "NaN or infinite", "an infinite sample");
    st = of_encoder_run_audio(e, tone.data(), 0, 22050, rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "no samples", "no samples");
    tone[5] = 0.0f;
    st = of_encoder_run_audio(e, tone.data(), tone.size(), 999, rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "999 Hz is outside", "a sample rate below 1000 Hz");
    CHECK(of_encoder_run_audio(e, nullptr, 10, 16000, rows.data(), rows.size()) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_encoder_audio_input(e, tone.data(), tone.size(), 16000, x.data(), x.size(), nullptr) == OF_ERR_INVALID_ARGUMENT);
}

// The image front end from RGB pixels: its item through of_encoder_run gives the same rows as
// of_encoder_run_images; bad pixels are refused.
static void check_pixels_in(of_encoder* e, const char* modality, const std::vector<int64_t>& shape, int64_t batch,
                            const std::vector<float>& scratch) {
    const int64_t w = 45, h = 37;
    const size_t stride = size_t(w) * 3 + 7;  // padded rows
    std::vector<uint8_t> px(size_t(h) * stride);
    for (size_t i = 0; i < px.size(); ++i) px[i] = uint8_t((i * 37 + i / 11) % 256);
    const of_image img{px.data(), w, h, stride};
    std::vector<float> item(product(shape)), rows(scratch.size()), want(scratch.size());
    if (std::string(modality) == "audio") {
        of_status st = of_encoder_image_input(e, &img, item.data(), item.size());
        expect_refusal(st, OF_ERR_UNSUPPORTED, of_last_error(e), "not pixels", "pixels for the audio encoder");
        check_samples_in(e, item.size(), rows, want);
        return;
    }
    std::vector<float> tone(8000, 0.1f);
    of_status sst = of_encoder_run_audio(e, tone.data(), tone.size(), 16000, rows.data(), rows.size());
    expect_refusal(sst, OF_ERR_UNSUPPORTED, of_last_error(e), "not audio samples", "samples for an image encoder");
    CHECK(of_encoder_image_input(e, &img, item.data(), item.size()) == OF_OK);
    const std::vector<of_image> frames(size_t(batch), img);
    CHECK(of_encoder_run_images(e, frames.data(), frames.size(), rows.data(), rows.size()) == OF_OK);
    std::vector<float> items;
    for (int64_t i = 0; i < batch; ++i) items.insert(items.end(), item.begin(), item.end());
    CHECK(of_encoder_run(e, items.data(), items.size(), batch, want.data(), want.size()) == OF_OK);
    CHECK(rows == want);
    of_image bad = img;
    bad.stride = size_t(w) * 3 - 1;
    of_status st = of_encoder_image_input(e, &bad, item.data(), item.size());
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(e), "row stride", "rows closer than the width");
    bad = img;
    bad.height = 0;
    st = of_encoder_run_images(e, &bad, 1, rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "no pixels", "an image of height 0");
    bad = img;
    bad.pixels = nullptr;
    st = of_encoder_run_images(e, &bad, 1, rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(e), "null pointer", "null pixels");
    st = of_encoder_image_input(e, &img, item.data(), item.size() + 1);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(e), "input buffer must hold", "an input buffer too big");
    CHECK(of_encoder_run_images(e, nullptr, 1, rows.data(), rows.size()) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_encoder_run_images(e, frames.data(), 0, rows.data(), rows.size()) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_encoder_image_input(nullptr, &img, item.data(), item.size()) == OF_ERR_INVALID_ARGUMENT);
}

// The whole request in one call: an image's pixels in, the image forced out; bad requests refused;
// the build closed before the pipeline.
static void check_pipeline(const char* build_path) {
    CHECK(of_pipeline_open(nullptr, 1, 0, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(std::strlen(of_pipeline_last_error(nullptr)) > 0);
    of_pipeline_close(nullptr);
    of_response_free(nullptr);
    CHECK(of_response_media_count(nullptr) == 0 && of_response_media(nullptr, 0) == nullptr && of_response_generation(nullptr) == nullptr);
    of_build* b = nullptr;
    CHECK(of_build_open(build_path, nullptr, &b) == OF_OK);
    of_pipeline* p = nullptr;
    CHECK(of_pipeline_open(b, 1, 0, &p) == OF_OK);
    of_build_close(b);  // the pipeline keeps what it needs
    std::vector<uint8_t> px(37 * 45 * 3);
    for (size_t i = 0; i < px.size(); ++i) px[i] = uint8_t(i * 31 % 256);
    const of_image img{px.data(), 45, 37, 0};
    const std::string prompt = "Describe it and draw it";
    of_request r;
    of_request_init(&r);
    r.prompt = prompt.data();
    r.prompt_len = prompt.size();
    r.image = &img;
    r.force = "image";
    of_generate_options go;
    of_generate_options_init(&go);
    go.max_new_tokens = 6;
    of_decoder_options dopt;
    of_decoder_options_init(&dopt);
    dopt.steps = 1;
    of_response* resp = nullptr;
    of_status st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    CHECK(st == OF_OK);
    if (st != OF_OK) std::fprintf(stderr, "of_pipeline_run: %s\n", of_last_error(p));
    size_t n = 0;
    CHECK(of_generation_tokens(of_response_generation(resp), &n) != nullptr && n >= 1 && n <= 6);
    CHECK(of_response_media_count(resp) == 1 && of_response_media(resp, 1) == nullptr);
    const of_media* m = of_response_media(resp, 0);
    CHECK(m && std::string(of_media_kind(m)) == "image");
    const float* data = of_media_data(m, &n);
    CHECK(data && n > 0 && std::all_of(data, data + n, [](float v) { return std::isfinite(v); }));
    of_response_free(resp);

    r.force = "image, smell";
    st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(p), "unknown modality 'smell'", "a request forcing no modality");
    CHECK(resp == nullptr);
    r.force = "image";
    dopt.steps = 0;
    st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(p), "steps must be >= 1", "a forced modality with 0 steps");
    dopt.steps = 1;
    const float bad_latents[3] = {0, 0, 0};
    const of_latents lat[2] = {{"image", bad_latents, 3}, {"image", bad_latents, 3}};
    r.latents = lat;
    r.n_latents = 2;
    st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(p), "given twice", "latents given twice");
    r.n_latents = 1;
    st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(p), "latents must have shape", "latents of the wrong size");
    r.n_latents = 0;
    r.struct_size = 1;
    st = of_pipeline_run(p, &r, &go, &dopt, &resp);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(p), "of_request_init", "a request not set up");
    CHECK(of_pipeline_run(p, nullptr, &go, &dopt, &resp) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_pipeline_run(p, &r, &go, &dopt, nullptr) == OF_ERR_INVALID_ARGUMENT);
    of_pipeline_close(p);
}

static void check_media(const char* build_path) {
    CHECK(of_encoder_open(nullptr, "image", nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(std::strlen(of_encoder_last_error(nullptr)) > 0 && std::string(of_encoder_input_name(nullptr)).empty());
    of_encoder_close(nullptr);
    of_build* b = nullptr;
    CHECK(of_build_open(build_path, nullptr, &b) == OF_OK);
    of_encoder* e = nullptr;
    of_status st = of_encoder_open(b, "smell", &e);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "unknown modality 'smell'", "an encoder of no modality");
    st = of_encoder_open(b, nullptr, &e);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "null pointer", "a null encoder modality");
    for (const char* modality : {"image", "video", "audio"}) {
        st = of_encoder_open(b, modality, &e);
        if (st != OF_OK) {
            std::fprintf(stderr, "the %s encoder did not open: %s %s\n", modality, of_status_name(st), of_last_error(b));
            ++failures;
            continue;
        }
        size_t rank = 0, rows = 0, width = 0;
        CHECK(of_encoder_input_shape(e, nullptr, 0, &rank) == OF_OK && rank >= 2);
        std::vector<int64_t> shape(rank);
        CHECK(of_encoder_input_shape(e, shape.data(), shape.size(), &rank) == OF_OK && shape[0] == 1);
        CHECK(of_encoder_rows(e, &rows, &width) == OF_OK && rows >= 1 && width >= 1);
        CHECK(of_encoder_rows(e, nullptr, &width) == OF_ERR_INVALID_ARGUMENT);
        const int64_t batch = std::string(modality) == "video" ? 3 : 1;
        std::vector<float> x(product(shape) * size_t(batch), 0.25f), out(rows * width, -1.0f);
        CHECK(of_encoder_run(e, x.data(), x.size(), batch, out.data(), out.size()) == OF_OK);
        CHECK(std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v) && v != -1.0f; }));
        st = of_encoder_run(e, x.data(), x.size() - 1, batch, out.data(), out.size());
        expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "must hold", "encoder input of the wrong size");
        x[0] = NAN;
        st = of_encoder_run(e, x.data(), x.size(), batch, out.data(), out.size());
        expect_refusal(st, OF_ERR_INPUT, of_last_error(e), "NaN", "encoder input with NaN");
        x[0] = 0.25f;
        st = of_encoder_run(e, x.data(), x.size(), batch, out.data(), out.size() + 1);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(e), "rows buffer must hold", "encoder rows buffer too big");
        st = of_encoder_run(e, x.data(), x.size(), 0, out.data(), out.size());
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(e), "batch must be in", "encoder batch 0");
        CHECK(of_encoder_run(e, nullptr, x.size(), batch, out.data(), out.size()) == OF_ERR_INVALID_ARGUMENT);
        CHECK(of_encoder_run(e, x.data(), x.size(), batch, nullptr, out.size()) == OF_ERR_INVALID_ARGUMENT);
        check_pixels_in(e, modality, shape, batch, out);
        of_encoder_close(e);
    }

    // token embeddings, then the image decoder's conditioning from hidden states
    of_llm* llm = nullptr;
    CHECK(of_llm_open(b, 1, 0, &llm) == OF_OK);
    int32_t layers = 0, hidden = 0, vocab = 0, ctx = 0;
    CHECK(of_build_llm_geometry(b, &layers, &hidden, &vocab, &ctx) == OF_OK);
    std::vector<int32_t> ids{1, 2, 3};
    std::vector<float> rows(ids.size() * size_t(hidden));
    CHECK(of_llm_embed_tokens(llm, ids.data(), ids.size(), rows.data(), rows.size()) == OF_OK);
    ids[1] = vocab;
    st = of_llm_embed_tokens(llm, ids.data(), ids.size(), rows.data(), rows.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "token ids must lie in", "an embedded id past the vocabulary");
    st = of_llm_embed_tokens(llm, ids.data(), ids.size(), rows.data(), rows.size() - 1);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "rows must hold", "an embedding buffer too small");
    of_decoder* d = nullptr;
    CHECK(of_decoder_open(b, "image", &d) == OF_OK);
    of_build* b2 = nullptr;
    CHECK(of_build_open(build_path, nullptr, &b2) == OF_OK);
    of_build_close(b);  // the handles keep what they need
    size_t n_signal = 0, width = 0;
    CHECK(of_decoder_conditioning_input(d, &n_signal, &width) == OF_OK && n_signal >= 1 && width == size_t(hidden));
    std::vector<float> h(n_signal * width, 0.5f), cond(product(shape_of(d, false)));
    CHECK(of_decoder_conditioning(d, llm, h.data(), h.size(), cond.data(), cond.size()) == OF_OK);
    CHECK(of_decoder_conditioning(d, nullptr, h.data(), h.size(), cond.data(), cond.size()) == OF_OK);
    st = of_decoder_conditioning(d, nullptr, h.data(), h.size() - 1, cond.data(), cond.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(d), "signal hidden states of", "hidden states of the wrong size");
    st = of_decoder_conditioning(d, nullptr, h.data(), h.size(), cond.data(), cond.size() - 1);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(d), "conditioning buffer must hold", "a conditioning buffer too small");
    CHECK(of_decoder_conditioning(d, nullptr, nullptr, h.size(), cond.data(), cond.size()) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_decoder_conditioning_input(d, nullptr, &width) == OF_ERR_INVALID_ARGUMENT);

    // a prompt with an image, then the image's signal-token hidden states (teacher-forced)
    of_encoder* ie = nullptr;
    CHECK(of_encoder_open(b2, "image", &ie) == OF_OK);
    size_t rank = 0, rows_n = 0, w = 0;
    CHECK(of_encoder_input_shape(ie, nullptr, 0, &rank) == OF_OK);
    std::vector<int64_t> shape(rank);
    CHECK(of_encoder_input_shape(ie, shape.data(), rank, &rank) == OF_OK && of_encoder_rows(ie, &rows_n, &w) == OF_OK);
    std::vector<float> px(product(shape), 0.1f), img_rows(rows_n * w);
    CHECK(of_encoder_run(ie, px.data(), px.size(), 1, img_rows.data(), img_rows.size()) == OF_OK);
    of_media_rows item{"image", img_rows.data(), rows_n};
    of_generate_options go;
    of_generate_options_init(&go);
    go.max_new_tokens = 6;
    go.collect_signal_hidden = 1;
    const char* prompt = "describe it";
    of_generation* g = nullptr;
    st = of_llm_generate_media(llm, prompt, std::strlen(prompt), &item, 1, &go, &g);
    CHECK(st == OF_OK && g && of_generation_prompt_tokens(g) > rows_n);
    std::vector<float> sh(n_signal * width);
    CHECK(of_llm_signal_hidden(llm, g, "image", sh.data(), sh.size()) == OF_OK);
    CHECK(std::all_of(sh.begin(), sh.end(), [](float v) { return std::isfinite(v); }));
    CHECK(of_decoder_conditioning(d, llm, sh.data(), sh.size(), cond.data(), cond.size()) == OF_OK);
    st = of_llm_signal_hidden(llm, g, "image", sh.data(), sh.size() + 1);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "buffer must hold", "a hidden-state buffer too big");
    st = of_llm_signal_hidden(llm, g, "smell", sh.data(), sh.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "no signal tokens for 'smell'", "signal hidden states of no modality");
    of_generation_free(g);
    g = nullptr;
    // teacher forcing by hand: the image's rows then two tokens
    std::vector<int32_t> two{1, 2};
    std::vector<float> forced(2 * width);
    CHECK(of_llm_hidden_after(llm, img_rows.data(), rows_n, two.data(), two.size(), forced.data(), forced.size()) == OF_OK);
    CHECK(std::all_of(forced.begin(), forced.end(), [](float v) { return std::isfinite(v); }));
    st = of_llm_hidden_after(llm, img_rows.data(), rows_n, two.data(), two.size(), forced.data(), forced.size() - 1);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "buffer must hold", "a forced-hidden buffer too small");
    two[1] = vocab;
    st = of_llm_hidden_after(llm, img_rows.data(), rows_n, two.data(), two.size(), forced.data(), forced.size());
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "token ids must lie in", "a forced id past the vocabulary");
    CHECK(of_llm_hidden_after(llm, nullptr, rows_n, two.data(), two.size(), forced.data(), forced.size()) == OF_ERR_INVALID_ARGUMENT);
    go.collect_signal_hidden = 0;
    CHECK(of_llm_generate_media(llm, prompt, std::strlen(prompt), &item, 1, &go, &g) == OF_OK);
    st = of_llm_signal_hidden(llm, g, "image", sh.data(), sh.size());
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "without collect_signal_hidden", "forced hidden states, prompt not kept");
    of_generation_free(g);
    g = nullptr;
    img_rows[1] = NAN;
    st = of_llm_generate_media(llm, prompt, std::strlen(prompt), &item, 1, &go, &g);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "contain NaN", "media rows with NaN");
    of_media_rows smell{"smell", img_rows.data(), rows_n};
    st = of_llm_generate_media(llm, prompt, std::strlen(prompt), &smell, 1, &go, &g);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "unknown modality 'smell'", "media of no modality");
    st = of_llm_generate_media(llm, prompt, std::strlen(prompt), nullptr, 1, &go, &g);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "null media");
    CHECK(g == nullptr);
    of_encoder_close(ie);
    of_build_close(b2);
    of_decoder_close(d);
    of_llm_close(llm);
}

// ---- signal events ----

struct SignalSeen {
    const of_llm* llm;
    std::vector<std::pair<std::string, int32_t>> events;  // (modality, token id) seen while streaming
};

static int on_signal_token(void* user, int32_t token_id, const char*, size_t) {
    auto* seen = static_cast<SignalSeen*>(user);
    if (const char* m = of_llm_signal_modality(seen->llm, token_id)) seen->events.emplace_back(m, token_id);
    return 0;
}

// The signal events of a sampled request (the default model generates some for this seed): each
// names a generated token of the build's signal tokens, at its index; the streamed view agrees; a
// token listed under two modalities is refused at of_llm_open.
static void check_signals(const fs::path& src, const fs::path& tmp) {
    CHECK(of_generation_signal_count(nullptr) == 0);
    CHECK(of_generation_signal(nullptr, 0, nullptr, nullptr, nullptr, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_llm_signal_modality(nullptr, 0) == nullptr);
    of_build* b = nullptr;
    CHECK(of_build_open(src.c_str(), nullptr, &b) == OF_OK);
    of_llm* llm = nullptr;
    CHECK(of_llm_open(b, 1, 0, &llm) == OF_OK);
    of_tokenizer* tok = nullptr;
    CHECK(of_build_tokenizer(b, &tok) == OF_OK);
    of_build_close(b);
    if (!llm || !tok) {
        of_llm_close(llm);
        of_tokenizer_close(tok);
        return;
    }
    int32_t img0 = -1;
    CHECK(of_tokenizer_token_to_id(tok, "[IMG0]", &img0) == OF_OK);
    CHECK(of_llm_signal_modality(llm, img0) != nullptr && std::string(of_llm_signal_modality(llm, img0)) == "image");
    CHECK(of_llm_signal_modality(llm, 1) == nullptr && of_llm_signal_modality(llm, -1) == nullptr);

    of_generate_options o;
    of_generate_options_init(&o);
    o.max_new_tokens = 48;
    o.temperature = 0.9;
    o.top_k = 40;
    o.top_p = 0.9;
    o.seed = 11;
    SignalSeen seen{llm, {}};
    o.on_token = on_signal_token;
    o.user_data = &seen;
    const int32_t prompt[] = {1, 5, 9, 3, 7};
    of_generation* g = nullptr;
    CHECK(of_llm_generate(llm, prompt, 5, &o, &g) == OF_OK);
    size_t n = 0;
    const int32_t* ids = of_generation_tokens(g, &n);
    const size_t count = of_generation_signal_count(g);
    CHECK(count > 0 && count == seen.events.size());
    size_t signals_in_tokens = 0;
    for (size_t k = 0; k < n; ++k) signals_in_tokens += of_llm_signal_modality(llm, ids[k]) != nullptr;
    CHECK(signals_in_tokens == count);
    size_t last = 0;
    for (size_t i = 0; i < count; ++i) {
        const char* modality = nullptr;
        const char* token = nullptr;
        int32_t id = -1;
        size_t index = n;
        CHECK(of_generation_signal(g, i, &modality, &token, &id, &index) == OF_OK);
        CHECK(modality && token && index < n && ids[index] == id && (i == 0 || index > last));
        if (!modality || !token || index >= n) continue;
        last = index;
        const std::string m = modality;
        CHECK(m == "image" || m == "video" || m == "audio");
        CHECK(m == of_llm_signal_modality(llm, id) && seen.events[i] == std::make_pair(m, id));
        int32_t back = -1;
        CHECK(of_tokenizer_token_to_id(tok, token, &back) == OF_OK && back == id);
        CHECK(token[0] == '[' && std::strlen(token) >= 6);
        CHECK(of_generation_signal(g, i, nullptr, nullptr, nullptr, nullptr) == OF_OK);
        const float* row = nullptr;
        size_t width = 1;
        CHECK(of_generation_signal_hidden(g, i, &row, &width) == OF_OK && !row && width == 0);  // not collected
    }
    CHECK(of_generation_signal(g, count, nullptr, nullptr, nullptr, nullptr) == OF_ERR_INVALID_ARGUMENT);
    of_generation_free(g);

    // the same request collecting the hidden states: one finite row of hidden_size per event (the
    // default build has no protocol: 'at_token'; a signal token generated last may have none)
    int32_t hidden_size = 0;
    of_build* b2 = nullptr;
    CHECK(of_build_open(src.c_str(), nullptr, &b2) == OF_OK);
    CHECK(of_build_llm_geometry(b2, nullptr, &hidden_size, nullptr, nullptr) == OF_OK);
    of_build_close(b2);
    o.collect_signal_hidden = 1;
    seen.events.clear();
    CHECK(of_llm_generate(llm, prompt, 5, &o, &g) == OF_OK);
    CHECK(of_generation_signal_count(g) == count);
    for (size_t i = 0; i < count; ++i) {
        const float* row = nullptr;
        size_t width = 0;
        size_t index = 0;
        CHECK(of_generation_signal(g, i, nullptr, nullptr, nullptr, &index) == OF_OK);
        CHECK(of_generation_signal_hidden(g, i, &row, &width) == OF_OK);
        CHECK(index + 1 == n || (row && width == size_t(hidden_size)));
        for (size_t k = 0; row && k < width; ++k) CHECK(std::isfinite(row[k]));
    }
    const float* row = nullptr;
    size_t width = 0;
    CHECK(of_generation_signal_hidden(g, count, &row, &width) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_generation_signal_hidden(g, 0, nullptr, &width) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_generation_signal_hidden(g, 0, &row, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_generation_signal_hidden(nullptr, 0, &row, &width) == OF_ERR_INVALID_ARGUMENT);
    of_generation_free(g);
    of_tokenizer_close(tok);
    of_llm_close(llm);

    // a token listed for two modalities: the runtimes would disagree on it
    const fs::path dst = tmp / "signal-twice";
    fs::remove_all(dst);
    fs::copy(src, dst, fs::copy_options::recursive);
    std::string s = read_text(dst / "manifest.json");
    replace_once(s, "\"[AUD0]\"", "\"[IMG0]\", \"[AUD0]\"");
    write_text(dst / "manifest.json", s);
    of_build_options bo;
    of_build_options_init(&bo);
    bo.skip_verify = 1;
    CHECK(of_build_open(dst.c_str(), &bo, &b) == OF_OK);
    of_llm* twice = nullptr;
    of_status st = of_llm_open(b, 1, 0, &twice);
    expect_refusal(st, OF_ERR_MANIFEST, of_last_error(b), "'[IMG0]' is listed for both", "a signal token under two modalities");
    CHECK(twice == nullptr);
    of_build_close(b);
    fs::remove_all(dst);
}

// Prompts given as rows (of_llm_generate_embeddings): refusals, a run, and the prefix cache
// matching rows (the same rows again reuse whole blocks and give the same tokens).
static void check_embeddings(const fs::path& src) {
    of_build* b = nullptr;
    CHECK(of_build_open(src.c_str(), nullptr, &b) == OF_OK);
    int32_t hidden = 0, vocab = 0, ctx = 0;
    CHECK(of_build_llm_geometry(b, nullptr, &hidden, &vocab, &ctx) == OF_OK);
    of_llm* llm = nullptr;
    CHECK(of_llm_open(b, 2, 0, &llm) == OF_OK);
    of_build_close(b);
    if (!llm || hidden <= 0) {
        of_llm_close(llm);
        return;
    }
    const size_t n = 40;
    std::vector<float> rows(n * size_t(hidden));
    uint32_t state = 7;
    for (float& x : rows) {  // small seeded values, as projected media rows are
        state = state * 1664525u + 1013904223u;
        x = (float(state >> 8) / float(1u << 24) - 0.5f) * 0.1f;
    }
    const int32_t history[] = {1, 5, 9};
    of_generate_options o;
    of_generate_options_init(&o);
    o.max_new_tokens = 8;
    o.n_stop_token_ids = 0;
    of_generation* g = nullptr;
    CHECK(of_llm_generate_embeddings(nullptr, rows.data(), n, history, 3, &o, &g) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_llm_generate_embeddings(llm, nullptr, n, history, 3, &o, &g) == OF_ERR_INVALID_ARGUMENT && !g);
    CHECK(of_llm_generate_embeddings(llm, rows.data(), n, nullptr, 3, &o, &g) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_llm_generate_embeddings(llm, rows.data(), n, history, 3, &o, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_llm_generate_embeddings(llm, rows.data(), 0, history, 3, &o, &g) == OF_ERR_INPUT);
    CHECK(of_llm_generate_embeddings(llm, rows.data(), size_t(ctx), history, 3, &o, &g) == OF_ERR_CONTEXT_LENGTH);
    const int32_t out_of_vocab[] = {vocab};
    CHECK(of_llm_generate_embeddings(llm, rows.data(), n, out_of_vocab, 1, &o, &g) == OF_ERR_INPUT);
    std::vector<float> nan_rows(rows);
    nan_rows[5] = std::nanf("");
    CHECK(of_llm_generate_embeddings(llm, nan_rows.data(), n, history, 3, &o, &g) == OF_ERR_INPUT);
    CHECK(std::string(of_llm_last_error(llm)).find("NaN") != std::string::npos);

    CHECK(of_llm_set_prefix_cache(llm, 1, 16) == OF_OK);
    std::vector<int32_t> first;
    for (int round = 0; round < 2; ++round) {
        CHECK(of_llm_generate_embeddings(llm, rows.data(), n, history, 3, &o, &g) == OF_OK);
        size_t k = 0;
        const int32_t* ids = of_generation_tokens(g, &k);
        CHECK(k == 8 && of_generation_prompt_tokens(g) == n);
        std::vector<int32_t> got(ids, ids + k);
        if (round == 0) {
            first = got;
            CHECK(of_generation_reused_tokens(g) == 0);
        } else {
            CHECK(got == first && of_generation_reused_tokens(g) == 32);  // two whole blocks of the 40 rows
        }
        of_generation_free(g);
        g = nullptr;
    }
    of_llm_close(llm);
}

int main() {
    const char* build_path = std::getenv("OMNIFORGE_TEST_BUILD");
    if (!build_path || !std::getenv("OMNIFORGE_ORT_LIBRARY")) {
        std::printf("OMNIFORGE_TEST_BUILD and OMNIFORGE_ORT_LIBRARY must name a build folder and ONNX Runtime's library\n");
        return 77;
    }
    const fs::path src(build_path);
    const fs::path tmp = fs::temp_directory_path() / ("omniforge-native-test-" + std::to_string(::getpid()));
    fs::create_directories(tmp);

    // ---- null pointers and bad arguments ----
    of_build* b = nullptr;
    CHECK(of_build_open(build_path, nullptr, nullptr) == OF_ERR_INVALID_ARGUMENT);
    of_status st = of_build_open(nullptr, nullptr, &b);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "null pointer", "null build path");
    of_build_close(b);
    st = of_build_open("", nullptr, &b);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "empty", "empty build path");
    of_build_close(b);
    CHECK(of_llm_open(nullptr, 1, 0, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(of_llm_generate_greedy(nullptr, nullptr, 0, 1, -1, nullptr, 0, nullptr) == OF_ERR_INVALID_ARGUMENT);
    CHECK(std::strlen(of_build_last_error(nullptr)) > 0 && std::strlen(of_llm_last_error(nullptr)) > 0);
    of_build_close(nullptr);
    of_llm_close(nullptr);
    CHECK(of_build_llm_geometry(nullptr, nullptr, nullptr, nullptr, nullptr) == OF_ERR_INVALID_ARGUMENT);
    st = of_build_open((tmp / "nowhere").c_str(), nullptr, &b);
    expect_refusal(st, OF_ERR_MANIFEST, of_last_error(b), "not a build folder", "a folder without a manifest");
    CHECK(of_llm_open(b, 1, 0, nullptr) == OF_ERR_INVALID_ARGUMENT);
    of_llm* none = nullptr;
    st = of_llm_open(b, 1, 0, &none);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "failed to open", "an LLM from a failed build");
    CHECK(none == nullptr);
    of_build_close(b);

    // ---- the build as written ----
    st = of_build_open(build_path, nullptr, &b);
    if (st != OF_OK) {
        std::fprintf(stderr, "the build did not open: %s %s\n", of_status_name(st), of_last_error(b));
        return 1;
    }
    int32_t layers = 0, hidden = 0, vocab = 0, ctx = 0;
    CHECK(of_build_llm_geometry(b, &layers, &hidden, &vocab, &ctx) == OF_OK);
    CHECK(layers > 0 && hidden > 0 && vocab > 8 && ctx > 40);
    of_llm* llm = nullptr;
    st = of_llm_open(b, 0, 0, &llm);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "num_slots", "zero slots");
    st = of_llm_open(b, 1, ctx + 1, &llm);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(b), "max context", "a context beyond the model's");
    st = of_llm_open(b, 2, 0, &llm);
    if (st != OF_OK) {
        std::fprintf(stderr, "the LLM did not open: %s %s\n", of_status_name(st), of_last_error(b));
        return 1;
    }
    CHECK(std::string(of_llm_embedding_form(llm)) == "table_fp32");  // the default build's single Gather
    CHECK(std::string(of_llm_embedding_form(nullptr)).empty());
    std::vector<int32_t> prompt{1, 5, 9, 3, 7};
    std::vector<int32_t> out(64), again(64);
    size_t n = 0, n2 = 0;
    CHECK(of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 32, -1, out.data(), out.size(), &n) == OF_OK);
    CHECK(n == 32);
    CHECK(of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 32, -1, again.data(), again.size(), &n2) == OF_OK);
    CHECK(n2 == n && std::equal(out.begin(), out.begin() + n, again.begin()));  // the slot was reset
    // an eos id stops at its first occurrence, included
    size_t stop_at = 5;
    int32_t eos = out[stop_at];
    size_t first = 0;
    while (out[first] != eos) ++first;
    CHECK(of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 32, eos, again.data(), again.size(), &n2) == OF_OK);
    CHECK(n2 == first + 1 && again[first] == eos);

    // ---- of_llm_generate: options, results, streaming ----
    {
        of_generate_options go;
        of_generate_options_init(&go);
        CHECK(go.struct_size == sizeof go && go.max_new_tokens == 64 && go.n_stop_token_ids == -1 && go.top_p == 1.0);
        of_generation* g = nullptr;
        CHECK(of_llm_generate(nullptr, prompt.data(), prompt.size(), &go, &g) == OF_ERR_INVALID_ARGUMENT);
        st = of_llm_generate(llm, prompt.data(), prompt.size(), &go, nullptr);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "a null result address");
        go.max_new_tokens = 8;
        go.n_stop_token_ids = 0;
        CHECK(of_llm_generate(llm, prompt.data(), prompt.size(), &go, &g) == OF_OK && g);
        size_t gn = 0;
        const int32_t* gt = of_generation_tokens(g, &gn);
        CHECK(gn == 8 && std::equal(gt, gt + gn, out.begin()));  // greedy, as of_llm_generate_greedy
        CHECK(of_generation_finish_reason(g) == OF_FINISH_LENGTH && of_generation_prompt_tokens(g) == prompt.size());
        CHECK(std::string(of_finish_reason_name(of_generation_finish_reason(g))) == "length");
        of_generation_free(g);
        of_generation_free(nullptr);
        CHECK(of_generation_tokens(nullptr, &gn) == nullptr && gn == 0);

        // the callback sees every token and can stop the request
        struct Seen {
            std::vector<int32_t> ids;
        } seen;
        go.on_token = [](void* u, int32_t t, const char*, size_t) {
            auto* s = static_cast<Seen*>(u);
            s->ids.push_back(t);
            return s->ids.size() >= 3 ? 1 : 0;
        };
        go.user_data = &seen;
        CHECK(of_llm_generate(llm, prompt.data(), prompt.size(), &go, &g) == OF_OK);
        gt = of_generation_tokens(g, &gn);
        CHECK(gn == 3 && seen.ids.size() == 3 && std::equal(gt, gt + 3, seen.ids.begin()));
        CHECK(of_generation_finish_reason(g) == OF_FINISH_CANCELLED);
        of_generation_free(g);
        go.on_token = nullptr;

        auto refused = [&](const std::function<void(of_generate_options&)>& edit, of_status want, const char* part, const char* what) {
            of_generate_options bad;
            of_generate_options_init(&bad);
            edit(bad);
            of_generation* r = reinterpret_cast<of_generation*>(&bad);  // must be reset to NULL
            of_status s = of_llm_generate(llm, prompt.data(), prompt.size(), &bad, &r);
            expect_refusal(s, want, of_last_error(llm), part, what);
            CHECK(r == nullptr);
        };
        refused([](of_generate_options& o) { o.struct_size = 0; }, OF_ERR_INVALID_ARGUMENT, "of_generate_options_init", "options not initialised");
        refused([](of_generate_options& o) { o.temperature = -1; }, OF_ERR_INVALID_ARGUMENT, "temperature must be >= 0", "a negative temperature");
        refused([](of_generate_options& o) { o.temperature = 1e-5; }, OF_ERR_INVALID_ARGUMENT, "temperature must be 0 (greedy) or lie in", "a tiny temperature");
        refused([](of_generate_options& o) { o.temperature = NAN; }, OF_ERR_INVALID_ARGUMENT, "finite", "a NaN temperature");
        refused([](of_generate_options& o) { o.top_p = 0; }, OF_ERR_INVALID_ARGUMENT, "top_p must lie in (0, 1]", "top_p 0");
        refused([](of_generate_options& o) { o.top_p = 1.5; }, OF_ERR_INVALID_ARGUMENT, "top_p must lie in (0, 1]", "top_p 1.5");
        refused([](of_generate_options& o) { o.top_k = -1; }, OF_ERR_INVALID_ARGUMENT, "top_k must be >= 0", "a negative top_k");
        refused([](of_generate_options& o) { o.repetition_penalty = 0; }, OF_ERR_INVALID_ARGUMENT, "repetition_penalty must be > 0", "penalty 0");
        refused([](of_generate_options& o) { o.repetition_penalty = 1e9; }, OF_ERR_INVALID_ARGUMENT, "repetition_penalty must lie in", "a huge penalty");
        refused([](of_generate_options& o) { o.max_new_tokens = 0; }, OF_ERR_INVALID_ARGUMENT, "max_new_tokens", "zero new tokens (options)");
        refused([](of_generate_options& o) { o.n_stop_token_ids = 2; }, OF_ERR_INVALID_ARGUMENT, "null pointer", "stop ids without a pointer");
        static const int32_t negative_stop[] = {-4};
        refused([](of_generate_options& o) { o.stop_token_ids = negative_stop; o.n_stop_token_ids = 1; }, OF_ERR_INVALID_ARGUMENT,
                "stop token id must be >= 0", "a negative stop id");
        refused([](of_generate_options& o) { o.n_stop_token_ids = -2; }, OF_ERR_INVALID_ARGUMENT, "n_stop_token_ids", "a stop count below -1");
        refused([](of_generate_options& o) { o.n_stop_strings = 1; }, OF_ERR_INVALID_ARGUMENT, "null pointer", "stop strings without a pointer");
        static const char* const empty_stop[] = {""};
        refused([](of_generate_options& o) { o.stop_strings = empty_stop; o.n_stop_strings = 1; }, OF_ERR_INVALID_ARGUMENT,
                "non-empty", "an empty stop string");
        refused([](of_generate_options& o) { o.slot_wait_ms = -2; }, OF_ERR_INVALID_ARGUMENT, "slot_wait_ms", "slot_wait_ms -2");
        std::vector<int32_t> too_long(static_cast<size_t>(ctx), 1);
        st = of_llm_generate(llm, too_long.data(), too_long.size(), nullptr, &g);
        expect_refusal(st, OF_ERR_CONTEXT_LENGTH, of_last_error(llm), "context holds", "a prompt filling the context (generate)");
        int32_t outside[] = {vocab + 5};
        st = of_llm_generate(llm, outside, 1, nullptr, &g);
        expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "token ids must lie in", "an id outside the vocabulary (generate)");
        CHECK(std::string(of_status_name(OF_ERR_BUSY)) == "OF_ERR_BUSY");
    }

    // ---- the prefix cache: a second turn copies the first turn's KV in whole blocks ----
    {
        st = of_llm_set_prefix_cache(llm, 2, 8);  // as many entries as slots
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "fewer entries", "a prefix cache as large as the pool");
        st = of_llm_set_prefix_cache(llm, 1, 0);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "block_size", "a zero block size");
        CHECK(of_llm_set_prefix_cache(nullptr, 1, 8) == OF_ERR_INVALID_ARGUMENT);
        of_generate_options go;
        of_generate_options_init(&go);
        go.max_new_tokens = 12;
        go.n_stop_token_ids = 0;
        std::vector<int32_t> turn1{1, 5, 9, 3, 7, 2, 4, 6, 8, 10, 12};
        auto run = [&](const std::vector<int32_t>& ids, size_t* reused) {
            of_generation* g = nullptr;
            CHECK(of_llm_generate(llm, ids.data(), ids.size(), &go, &g) == OF_OK && g);
            size_t n = 0;
            const int32_t* t = of_generation_tokens(g, &n);
            std::vector<int32_t> tokens(t, t + n);
            *reused = of_generation_reused_tokens(g);
            of_generation_free(g);
            return tokens;
        };
        size_t reused = 0;
        const std::vector<int32_t> cold = run(turn1, &reused);  // cache off: nothing kept
        CHECK(reused == 0);
        CHECK(of_llm_set_prefix_cache(llm, 1, 8) == OF_OK);
        std::vector<int32_t> first = run(turn1, &reused);
        CHECK(reused == 0 && first == cold);
        std::vector<int32_t> turn2(turn1);  // the first turn as fed (the last token is not), then more
        turn2.insert(turn2.end(), first.begin(), first.end() - 1);
        turn2.insert(turn2.end(), {11, 13, 15});
        of_llm_set_prefix_cache(llm, 0, 8);
        const std::vector<int32_t> fresh = run(turn2, &reused);
        CHECK(reused == 0);
        of_llm_set_prefix_cache(llm, 1, 8);
        run(turn1, &reused);
        const std::vector<int32_t> second = run(turn2, &reused);
        CHECK(reused == 16 && second == fresh);  // 11 + 11 tokens fed in turn 1: two whole blocks of 8
        CHECK(run(turn1, &reused) == cold);      // a prefix of the entry, shorter than a block past it
        CHECK(of_llm_set_prefix_cache(llm, 0, 8) == OF_OK);  // off again: the slots are free
    }

    // ---- text and the tokenizer through the C API ----
    {
        of_generation* g = nullptr;
        const char bad_utf8[] = "caf\xc3";  // a character cut in half
        st = of_llm_generate_text(llm, bad_utf8, sizeof bad_utf8 - 1, nullptr, &g);
        expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "not valid UTF-8", "an invalid UTF-8 prompt");
        st = of_llm_generate_text(llm, nullptr, 3, nullptr, &g);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "a null text prompt");
        of_generate_options go;
        of_generate_options_init(&go);
        go.max_new_tokens = 6;
        const char hello[] = "Hello \xe4\xb8\x96\xe7\x95\x8c [IMG0]";
        CHECK(of_llm_generate_text(llm, hello, sizeof hello - 1, &go, &g) == OF_OK && g);
        size_t len = 0;
        const char* text = of_generation_text(g, &len);
        CHECK(text && std::strlen(text) == len && of_generation_prompt_tokens(g) > 3);
        of_generation_free(g);

        of_tokenizer* tok = nullptr;
        CHECK(of_build_tokenizer(b, &tok) == OF_OK && tok);
        CHECK(of_tokenizer_vocab_size(tok) > 40 && of_tokenizer_vocab_size(nullptr) == 0);
        size_t n_ids = 0;
        CHECK(of_tokenizer_encode(tok, hello, sizeof hello - 1, 1, nullptr, 0, &n_ids) == OF_OK && n_ids > 3);  // size query
        std::vector<int32_t> ids(n_ids);
        size_t n2 = 0;
        st = of_tokenizer_encode(tok, hello, sizeof hello - 1, 1, ids.data(), 1, &n2);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(tok), "the text needs", "an id buffer too small");
        CHECK(of_tokenizer_encode(tok, hello, sizeof hello - 1, 1, ids.data(), ids.size(), &n2) == OF_OK && n2 == n_ids);
        st = of_tokenizer_encode(tok, bad_utf8, sizeof bad_utf8 - 1, 1, ids.data(), ids.size(), &n2);
        expect_refusal(st, OF_ERR_INPUT, of_last_error(tok), "not valid UTF-8", "invalid UTF-8 to encode");
        char buf[256];
        CHECK(of_tokenizer_decode(tok, ids.data(), ids.size(), 0, buf, sizeof buf, &len) == OF_OK);
        CHECK(std::string(buf, len) == std::string(hello, sizeof hello - 1) && buf[len] == '\0');
        st = of_tokenizer_decode(tok, ids.data(), ids.size(), 0, buf, 4, &len);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(tok), "with its NUL", "a text buffer too small");
        int32_t id = -1;
        CHECK(of_tokenizer_token_to_id(tok, "[IMG0]", &id) == OF_OK && id >= 0);
        st = of_tokenizer_token_to_id(tok, "no such token here", &id);
        expect_refusal(st, OF_ERR_INPUT, of_last_error(tok), "not in the vocabulary", "an unknown token");
        CHECK(of_tokenizer_encode(nullptr, hello, 1, 1, nullptr, 0, &n2) == OF_ERR_INVALID_ARGUMENT);
        st = of_tokenizer_encode(tok, hello, 1, 1, nullptr, 0, nullptr);
        expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(tok), "null pointer", "a null id count");
        of_tokenizer_close(tok);
        of_tokenizer_close(nullptr);
        of_tokenizer* missing = nullptr;
        st = of_tokenizer_open((tmp / "no-tokenizer.json").c_str(), &missing);
        expect_refusal(st, OF_ERR_INPUT, of_last_error(missing), "cannot be read", "a tokenizer file that is not there");
        of_tokenizer_close(missing);
        CHECK(of_tokenizer_open("x", nullptr) == OF_ERR_INVALID_ARGUMENT);
    }

    int32_t bad_ids[] = {1, vocab};
    st = of_llm_generate_greedy(llm, bad_ids, 2, 4, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "token ids must lie in", "a token id out of the vocabulary");
    int32_t negative[] = {-3};
    st = of_llm_generate_greedy(llm, negative, 1, 4, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "token ids must lie in", "a negative token id");
    st = of_llm_generate_greedy(llm, prompt.data(), 0, 4, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_INPUT, of_last_error(llm), "empty", "an empty prompt");
    st = of_llm_generate_greedy(llm, nullptr, 3, 4, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "null prompt ids");
    st = of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 4, -1, nullptr, 4, &n);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "null output ids");
    st = of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 4, -1, out.data(), out.size(), nullptr);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "null pointer", "null output count");
    st = of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 40, -1, out.data(), 8, &n);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "fewer than max_new_tokens", "an output buffer too small");
    st = of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 0, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_INVALID_ARGUMENT, of_last_error(llm), "max_new_tokens", "zero new tokens");
    std::vector<int32_t> longest(static_cast<size_t>(ctx), 1);
    st = of_llm_generate_greedy(llm, longest.data(), longest.size(), 4, -1, out.data(), out.size(), &n);
    expect_refusal(st, OF_ERR_CONTEXT_LENGTH, of_last_error(llm), "context holds", "a prompt filling the context");
    // the LLM still works after refusals, and after its build handle is closed
    of_build_close(b);
    CHECK(of_llm_generate_greedy(llm, prompt.data(), prompt.size(), 32, -1, again.data(), again.size(), &n2) == OF_OK);
    CHECK(n2 == 32 && std::equal(out.begin(), out.begin() + 32, again.begin()));
    of_llm_close(llm);

    // a short context: generation stops when the next token would not fit (as the Python runtime)
    CHECK(of_build_open(build_path, nullptr, &b) == OF_OK);
    CHECK(of_llm_open(b, 1, 16, &llm) == OF_OK);
    std::vector<int32_t> ten(10, 2);
    CHECK(of_llm_generate_greedy(llm, ten.data(), ten.size(), 32, -1, out.data(), out.size(), &n) == OF_OK);
    CHECK(n == 7);  // 10 + 7 > 16
    of_llm_close(llm);
    of_build_close(b);

    check_decoders(build_path);
    check_media(build_path);
    check_pipeline(build_path);

    // ---- damaged builds ----
    std::string msg;
    st = open_copy(src, tmp, "flipped", [](const fs::path& d) {
        fs::path g = d / "stages" / "llm.ort.onnx";
        std::string s = read_text(g);
        s[s.size() / 2] ^= 0x01;
        write_text(g, s);
    }, msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "SHA-256", "a graph with a flipped byte");

    st = open_copy(src, tmp, "truncated", [](const fs::path& d) {
        fs::path g = d / "stages" / "token_embedding.onnx";
        std::string s = read_text(g);
        write_text(g, s.substr(0, s.size() - 1));
    }, msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "SHA-256", "a graph one byte short");

    // skip_verify: sizes match, so the build opens, but the graph is hashed as it is read
    of_build_options opts;
    of_build_options_init(&opts);
    opts.skip_verify = 1;
    {
        fs::path d = tmp / "flipped";
        CHECK(of_build_open(d.c_str(), &opts, &b) == OF_OK);
        st = of_llm_open(b, 1, 0, &llm);
        expect_refusal(st, OF_ERR_MANIFEST, of_last_error(b), "SHA-256", "a flipped byte read for a session");
        of_build_close(b);
    }

    auto edit_manifest = [](std::function<void(std::string&)> f) {
        return [f](const fs::path& d) {
            std::string s = read_text(d / "manifest.json");
            f(s);
            write_text(d / "manifest.json", s);
        };
    };
    st = open_copy(src, tmp, "dotdot", edit_manifest([](std::string& s) {
        replace_once(s, "\"stages/llm.ort.onnx\"", "\"stages/../../outside.onnx\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "leaves the build folder", "a manifest path with '..'");
    st = open_copy(src, tmp, "absolute", edit_manifest([](std::string& s) {
        replace_once(s, "\"path\": \"stages/llm.ort.onnx\"", "\"path\": \"/etc/passwd\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "leaves the build folder", "an absolute manifest path");
    st = open_copy(src, tmp, "backslash", edit_manifest([](std::string& s) {
        replace_once(s, "\"path\": \"stages/llm.ort.onnx\"", "\"path\": \"stages\\\\llm.ort.onnx\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "leaves the build folder", "a manifest path with a backslash");
    st = open_copy(src, tmp, "control", edit_manifest([](std::string& s) {
        replace_once(s, "\"path\": \"stages/llm.ort.onnx\"", "\"path\": \"stages/llm\\u0007.onnx\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "control character", "a manifest path with a control character");
    st = open_copy(src, tmp, "symlink", [&](const fs::path& d) {
        fs::path outside = tmp / "outside.onnx";
        fs::copy_file(d / "stages" / "token_embedding.onnx", outside, fs::copy_options::overwrite_existing);
        fs::remove(d / "stages" / "token_embedding.onnx");
        fs::create_symlink(outside, d / "stages" / "token_embedding.onnx");
    }, msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "resolves outside the build folder", "a symlink out of the folder");
    st = open_copy(src, tmp, "fifo", [&](const fs::path& d) {
        fs::remove(d / "stages" / "token_embedding.onnx");
        fs::create_directory(d / "stages" / "token_embedding.onnx");
    }, msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "not a regular file", "a folder where a graph should be");
    st = open_copy(src, tmp, "unlisted", edit_manifest([](std::string& s) {
        replace_once(s, "\"file\": \"stages/llm.ort.onnx\"", "\"file\": \"stages/other.onnx\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "not among the artifacts", "a variant file not among the artifacts");
    st = open_copy(src, tmp, "v1", edit_manifest([](std::string& s) {
        replace_once(s, "\"schema_version\": 2", "\"schema_version\": 1");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "schema version 1 is not supported", "a version-1 manifest");
    st = open_copy(src, tmp, "v3", edit_manifest([](std::string& s) {
        replace_once(s, "\"schema_version\": 2", "\"schema_version\": \"2\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "not supported", "a schema version that is a string");
    st = open_copy(src, tmp, "notjson", edit_manifest([](std::string& s) { s = s.substr(0, s.size() / 2); }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "not valid JSON", "a manifest cut in half");
    st = open_copy(src, tmp, "deep", edit_manifest([](std::string& s) { s = std::string(100000, '[') + std::string(100000, ']'); }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "nests deeper", "a manifest nested 100000 deep");
    st = open_copy(src, tmp, "huge", edit_manifest([](std::string& s) {
        replace_once(s, "\"schema_version\": 2", "\"schema_version\": 2, \"x\": 1e999999");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "not valid JSON", "a number beyond any float");
    st = open_copy(src, tmp, "size", edit_manifest([](std::string& s) {
        replace_once(s, "\"size\": ", "\"size\": -");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "size", "a negative artifact size");
    st = open_copy(src, tmp, "role", edit_manifest([](std::string& s) {
        replace_once(s, "\"role\": \"ort_inplace_llm\"", "\"role\": \"canonical\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "variant role twice", "a role listed twice");
    st = open_copy(src, tmp, "newrole", edit_manifest([](std::string& s) {
        replace_once(s, "\"role\": \"ort_inplace_llm\"", "\"role\": \"ort_streaming_llm\"");
    }), msg);
    expect_refusal(st, OF_ERR_MANIFEST, msg.c_str(), "does not know", "a variant role from a newer omniforge");

    // ---- ONNX Runtime that cannot be loaded ----
    of_build_options bad_lib;
    of_build_options_init(&bad_lib);
    bad_lib.ort_library = "/nonexistent/libonnxruntime.so.1";
    st = of_build_open(build_path, &bad_lib, &b);
    expect_refusal(st, OF_ERR_ENGINE, of_last_error(b), "could not be loaded", "a missing ONNX Runtime library");
    of_build_close(b);
    bad_lib.ort_library = "libc.so.6";
    st = of_build_open(build_path, &bad_lib, &b);
    expect_refusal(st, OF_ERR_ENGINE, of_last_error(b), "OrtGetApiBase", "a library that is not ONNX Runtime");
    of_build_close(b);

    check_signals(src, tmp);
    check_embeddings(src);

    fs::remove_all(tmp);
    if (failures) {
        std::fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all native checks passed\n");
    return 0;
}
