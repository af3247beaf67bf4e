// One any-to-any request on libomniforge, in one call (of_pipeline_run): an image in, the reply's
// text streamed, and the image and audio it asks for (or that --force asks for) written as PPM and
// WAV files.
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
        // the whole chain: the LLM now, the encoders and decoders when a request needs them
        Handle<of_pipeline, of_pipeline_close> pipeline;
        check(of_pipeline_open(build.p, 1, 0, &pipeline.p), of_last_error(build.p));

        const std::string prompt = argv[2];
        of_request request;
        of_request_init(&request);
        request.prompt = prompt.data();
        request.prompt_len = prompt.size();
        Picture pic;
        of_image image{};
        if (!image_in.empty()) {  // the pixels go through the build's image front end and encoder
            pic = read_ppm(image_in);
            image = of_image{pic.rgb.data(), pic.width, pic.height, 0};
            request.image = &image;
        }
        request.force = force.c_str();
        go.on_token = on_token;  // the reply, streamed

        of_response* response = nullptr;
        check(of_pipeline_run(pipeline.p, &request, &go, &dopt, &response), of_last_error(pipeline.p));
        std::unique_ptr<of_response, void (*)(of_response*)> done(response, of_response_free);
        std::printf("\n");

        // media out: each modality the reply asked for (or --force named), written where asked
        for (size_t i = 0; i < of_response_media_count(response); ++i) {
            const of_media* medium = of_response_media(response, i);
            const std::string kind = of_media_kind(medium);
            const std::string& path = kind == "image" ? out[0] : kind == "audio" ? out[1] : std::string();
            if (path.empty()) continue;
            size_t n = 0, rank = 0;
            const float* data = of_media_data(medium, &n);
            const int64_t* dims = of_media_shape(medium, &rank);
            if (kind == "image") write_ppm(path, data, dims[0], dims[1]);
            else write_wav(path, data, n, of_media_sample_rate(medium));
            std::fprintf(stderr, "%s: %s (denoise %.2f s, decode %.2f s)\n", kind.c_str(), path.c_str(), of_media_denoise_s(medium),
                         of_media_decode_s(medium));
        }
        const of_generation* reply = of_response_generation(response);
        size_t n_tokens = 0;
        of_generation_tokens(reply, &n_tokens);
        std::fprintf(stderr, "tokens=%zu finish=%s\n", n_tokens, of_finish_reason_name(of_generation_finish_reason(reply)));
        return 0;
    } catch (const Failure& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
