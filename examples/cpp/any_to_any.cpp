// One any-to-any request on libomniforge: an image in, the reply's text streamed, and the image and
// audio it asks for (or that --force asks for) written as PPM and WAV files.
//
//   any_to_any BUILD "PROMPT" [--image FILE.ppm] [--force image,audio] [--image-out FILE.ppm]
//              [--audio-out FILE.wav] [--max N] [--steps N] [--seed S]
//
// --image: an RGB image as a binary PPM (P6, 8 bits; any image tool writes one, and a service
// passes the pixels its own decoder gives), through the build's image front end, encoder and input
// projector. ONNX Runtime's library comes from OMNIFORGE_ORT_LIBRARY.
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "omniforge.h"

namespace {

struct Failure : std::runtime_error {
    explicit Failure(const std::string& what) : std::runtime_error(what) {}
};

void check(of_status st, const char* error) {
    if (st != OF_OK) throw Failure(std::string(of_status_name(st)) + ": " + error);
}

template <class T, void (*Close)(T*)>
struct Handle {
    T* p = nullptr;
    Handle() = default;
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { Close(p); }
};

// A binary PPM (P6, maxval 255): its pixels, rows of width x 3 bytes.
struct Picture {
    int64_t width = 0, height = 0;
    std::vector<uint8_t> rgb;
};

Picture read_ppm(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Failure("cannot read " + path);
    auto field = [&]() -> std::string {  // the next header field, skipping whitespace and # comments
        std::string tok;
        for (int c = f.get(); c != EOF; c = f.get()) {
            if (c == '#') {
                while (c != EOF && c != '\n') c = f.get();
            } else if (std::isspace(c)) {
                if (!tok.empty()) return tok;
            } else {
                tok += char(c);
            }
        }
        return tok;
    };
    Picture p;
    const std::string magic = field(), w = field(), h = field(), maxval = field();
    if (magic != "P6" || maxval != "255") throw Failure(path + " is not a binary 8-bit PPM (P6, maxval 255)");
    p.width = std::atoll(w.c_str());
    p.height = std::atoll(h.c_str());
    if (p.width < 1 || p.height < 1 || p.width > 65535 || p.height > 65535) throw Failure(path + " has no usable size");
    p.rgb.resize(size_t(p.width * p.height) * 3);
    f.read(reinterpret_cast<char*>(p.rgb.data()), std::streamsize(p.rgb.size()));
    if (f.gcount() != std::streamsize(p.rgb.size())) throw Failure(path + " is shorter than its " + w + "x" + h + " pixels");
    return p;
}

// (H, W, 3) floats in [0, 1] as a binary PPM
void write_ppm(const std::string& path, const float* px, int64_t h, int64_t w) {
    std::ofstream f(path, std::ios::binary);
    f << "P6\n" << w << " " << h << "\n255\n";
    for (int64_t i = 0; i < h * w * 3; ++i) f.put(static_cast<char>(static_cast<uint8_t>(px[i] * 255.0f + 0.5f)));
    if (!f) throw Failure("cannot write " + path);
}

// mono floats as 16-bit PCM
void write_wav(const std::string& path, const float* x, size_t n, int32_t rate) {
    std::ofstream f(path, std::ios::binary);
    auto u32 = [&](uint32_t v) { f.write(reinterpret_cast<const char*>(&v), 4); };
    auto u16 = [&](uint16_t v) { f.write(reinterpret_cast<const char*>(&v), 2); };
    f.write("RIFF", 4);
    u32(uint32_t(36 + 2 * n));
    f.write("WAVEfmt ", 8);
    u32(16), u16(1), u16(1), u32(uint32_t(rate)), u32(uint32_t(rate) * 2), u16(2), u16(16);
    f.write("data", 4);
    u32(uint32_t(2 * n));
    for (size_t i = 0; i < n; ++i) {
        const float v = x[i] < -1.0f ? -1.0f : x[i] > 1.0f ? 1.0f : x[i];
        u16(static_cast<uint16_t>(static_cast<int16_t>(v * 32767.0f)));
    }
    if (!f) throw Failure("cannot write " + path);
}

int on_token(void*, int32_t, const char* text, size_t len) {
    std::fwrite(text, 1, len, stdout);
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr,
                     "usage: %s BUILD \"PROMPT\" [--image FILE.ppm] [--force image,audio] [--image-out FILE.ppm] "
                     "[--audio-out FILE.wav] [--max N] [--steps N] [--seed S]\n",
                     argv[0]);
        return 2;
    }
    std::string image_in, force, out[2];
    of_generate_options go;
    of_generate_options_init(&go);
    of_decoder_options dopt;
    of_decoder_options_init(&dopt);
    for (int i = 3; i + 1 < argc; i += 2) {
        const std::string flag = argv[i];
        if (flag == "--image") image_in = argv[i + 1];
        else if (flag == "--force") force = argv[i + 1];
        else if (flag == "--image-out") out[0] = argv[i + 1];
        else if (flag == "--audio-out") out[1] = argv[i + 1];
        else if (flag == "--max") go.max_new_tokens = std::atoi(argv[i + 1]);
        else if (flag == "--steps") dopt.steps = std::atoi(argv[i + 1]);
        else if (flag == "--seed") dopt.seed = std::strtoull(argv[i + 1], nullptr, 10);
        else {
            std::fprintf(stderr, "unknown option %s\n", flag.c_str());
            return 2;
        }
    }
    try {
        Handle<of_build, of_build_close> build;
        check(of_build_open(argv[1], nullptr, &build.p), of_last_error(build.p));
        Handle<of_llm, of_llm_close> llm;
        check(of_llm_open(build.p, 1, 0, &llm.p), of_last_error(build.p));

        // media in: the image front end, the encoder and its input projector turn pixels into LLM rows
        std::vector<float> image_rows;
        std::vector<of_media_rows> media;
        if (!image_in.empty()) {
            const Picture pic = read_ppm(image_in);
            Handle<of_encoder, of_encoder_close> enc;
            check(of_encoder_open(build.p, "image", &enc.p), of_last_error(build.p));
            size_t n_rows = 0, width = 0;
            check(of_encoder_rows(enc.p, &n_rows, &width), of_last_error(enc.p));
            image_rows.resize(n_rows * width);
            const of_image image{pic.rgb.data(), pic.width, pic.height, 0};
            check(of_encoder_run_images(enc.p, &image, 1, image_rows.data(), image_rows.size()), of_last_error(enc.p));
            media.push_back({"image", image_rows.data(), n_rows});
        }

        // the reply, streamed, keeping the signal tokens' hidden states
        go.on_token = on_token;
        go.collect_signal_hidden = 1;
        of_generation* g = nullptr;
        const std::string prompt = argv[2];
        check(of_llm_generate_media(llm.p, prompt.data(), prompt.size(), media.data(), media.size(), &go, &g), of_last_error(llm.p));
        std::unique_ptr<of_generation, void (*)(of_generation*)> reply(g, of_generation_free);
        std::printf("\n");

        // media out: each modality the reply asks for (or --force names) with an output file
        const char* modalities[2] = {"image", "audio"};
        for (int m = 0; m < 2; ++m) {
            const std::string modality = modalities[m];
            bool asked = force.find(modality) != std::string::npos;
            for (size_t i = 0; i < of_generation_signal_count(g); ++i) {
                const char* which = nullptr;
                of_generation_signal(g, i, &which, nullptr, nullptr, nullptr);
                asked = asked || modality == which;
            }
            if (!asked || out[m].empty()) continue;
            Handle<of_decoder, of_decoder_close> dec;
            check(of_decoder_open(build.p, modality.c_str(), &dec.p), of_last_error(build.p));
            size_t n_signal = 0, hidden = 0, rank = 0;
            check(of_decoder_conditioning_input(dec.p, &n_signal, &hidden), of_last_error(dec.p));
            std::vector<float> signal(n_signal * hidden);
            check(of_llm_signal_hidden(llm.p, g, modality.c_str(), signal.data(), signal.size()), of_last_error(llm.p));
            int64_t shape[8];
            check(of_decoder_conditioning_shape(dec.p, shape, 8, &rank), of_last_error(dec.p));
            size_t n_cond = 1;
            for (size_t k = 0; k < rank; ++k) n_cond *= size_t(shape[k]);
            std::vector<float> cond(n_cond);
            check(of_decoder_conditioning(dec.p, llm.p, signal.data(), signal.size(), cond.data(), cond.size()), of_last_error(dec.p));
            of_media* result = nullptr;
            check(of_decoder_run(dec.p, cond.data(), cond.size(), nullptr, nullptr, 0, &dopt, &result), of_last_error(dec.p));
            std::unique_ptr<of_media, void (*)(of_media*)> medium(result, of_media_free);
            size_t n = 0, r = 0;
            const float* data = of_media_data(result, &n);
            const int64_t* dims = of_media_shape(result, &r);
            if (modality == "image") write_ppm(out[m], data, dims[0], dims[1]);
            else write_wav(out[m], data, n, of_media_sample_rate(result));
            std::fprintf(stderr, "%s: %s (denoise %.2f s, decode %.2f s)\n", modality.c_str(), out[m].c_str(), of_media_denoise_s(result),
                         of_media_decode_s(result));
        }
        size_t n_tokens = 0;
        of_generation_tokens(g, &n_tokens);
        std::fprintf(stderr, "tokens=%zu finish=%s\n", n_tokens, of_finish_reason_name(of_generation_finish_reason(g)));
        return 0;
    } catch (const Failure& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
