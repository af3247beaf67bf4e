// The diffusion decoders: one modality's UNet denoised with classifier-free guidance under a C++
// scheduler, then its VAE decoder (and, for audio, the vocoder), as the Python runtime's
// Pipeline._denoise / decode_image / decode_video / decode_audio compute them.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "internal.hpp"
#include "config_values.hpp"
#include "schedulers.hpp"
#include "stage_session.hpp"

namespace omniforge {

using json = nlohmann::json;

namespace {

constexpr double kMaxGuidance = 1000.0;       // MAX_GUIDANCE: beyond it the guided noise overflows float32
constexpr int64_t kMaxVideoFrames = 256;      // media.MAX_VIDEO_FRAMES
constexpr double kMinVaeScale = 1e-6, kMaxVaeScale = 1e6;
constexpr int64_t kMinSampleRate = 1000, kMaxSampleRate = 384000;
constexpr int64_t kMaxUpsample = 1024, kMaxMelBins = 1024;

// media.vae_scaling
float vae_scaling(const json& cfg) {
    const std::string what = "VAE";
    if (!cfg.is_object()) fail(OF_ERR_MANIFEST, "the VAE config must be an object, got " + std::string(cfg.type_name()));
    if (cfg.contains("block_out_channels")) size_list(cfg, "block_out_channels", what, 1 << 16);
    for (const char* key : {"shift_factor", "latents_mean", "latents_std"}) {
        auto it = cfg.find(key);
        if (it == cfg.end() || it->is_null()) continue;
        const bool zero = (it->is_number() && it->get<double>() == 0.0) || (it->is_boolean() && !it->get<bool>());
        if (!zero)
            fail(OF_ERR_MANIFEST, std::string("the VAE config's '") + key +
                                      "' is not supported (the runtime decodes latents / scaling_factor)");
    }
    auto it = cfg.find("scaling_factor");
    const json v = it == cfg.end() ? json(0.18215) : *it;
    if (!v.is_number() || !(kMinVaeScale <= v.get<double>() && v.get<double>() <= kMaxVaeScale))
        fail(OF_ERR_MANIFEST, "the VAE config's 'scaling_factor' must be a number in [1e-06, 1e+06], got " + py_shown(v));
    return static_cast<float>(v.get<double>());  // np.float32(scale)
}

// media.check_vocoder_config: the sampling rate
int32_t vocoder_rate(const json& cfg) {
    const std::string what = "vocoder";
    if (!cfg.is_object()) fail(OF_ERR_MANIFEST, "the vocoder config must be an object, got " + std::string(cfg.type_name()));
    if (cfg.contains("upsample_rates")) size_list(cfg, "upsample_rates", what, kMaxUpsample);
    if (cfg.contains("model_in_dim")) config_int(cfg, "model_in_dim", 1, kMaxMelBins, what, json());
    return static_cast<int32_t>(config_int(cfg, "sampling_rate", kMinSampleRate, kMaxSampleRate, what, json(16000)));
}

// A .npy file's values as float32 (numpy's format 1.0-3.0; C order; float16/32/64).
std::vector<float> read_npy(const std::vector<char>& data, const std::string& what, size_t want, std::string& why) {
    auto refuse = [&](const std::string& reason) -> std::vector<float> {
        why = "the " + what + " is not a numpy array (" + reason + ")";
        return {};
    };
    if (data.size() < 10 || std::memcmp(data.data(), "\x93NUMPY", 6) != 0) return refuse("no .npy magic string");
    const unsigned major = static_cast<unsigned char>(data[6]);
    size_t header_len = 0, start = 0;
    if (major == 1) {
        header_len = size_t(static_cast<unsigned char>(data[8])) | size_t(static_cast<unsigned char>(data[9])) << 8;
        start = 10;
    } else if (major == 2 || major == 3) {
        if (data.size() < 12) return refuse("a truncated header");
        for (int k = 0; k < 4; ++k) header_len |= size_t(static_cast<unsigned char>(data[8 + k])) << (8 * k);
        start = 12;
    } else {
        return refuse("format version " + std::to_string(major) + " is not one numpy writes");
    }
    if (header_len > data.size() - start) return refuse("a truncated header");
    const std::string header(data.data() + start, header_len);
    const size_t body = start + header_len;
    auto value_of = [&](const std::string& key) -> std::string {
        size_t at = header.find("'" + key + "'");
        if (at == std::string::npos) return "";
        at = header.find(':', at);
        if (at == std::string::npos) return "";
        size_t s = header.find_first_not_of(' ', at + 1);
        if (s == std::string::npos) return "";
        if (header[s] == '(') {
            size_t e = header.find(')', s);
            return e == std::string::npos ? "" : header.substr(s, e - s + 1);
        }
        if (header[s] == '\'') {
            size_t e = header.find('\'', s + 1);
            return e == std::string::npos ? "" : header.substr(s + 1, e - s - 1);
        }
        size_t e = header.find_first_of(",}", s);
        return e == std::string::npos ? "" : header.substr(s, e - s);
    };
    const std::string descr = value_of("descr"), order = value_of("fortran_order"), shape_text = value_of("shape");
    if (descr.size() < 3 || shape_text.empty() || (order != "False" && order != "True")) return refuse("an unreadable header");
    size_t count = 1;
    for (size_t k = 1; k + 1 < shape_text.size();) {
        size_t e = shape_text.find_first_of(",)", k);
        std::string part = shape_text.substr(k, e - k);
        part.erase(0, part.find_first_not_of(' '));
        if (!part.empty()) {
            if (part.find_first_not_of("0123456789") != std::string::npos || part.size() > 12) return refuse("an unreadable shape");
            count *= size_t(std::stoull(part));
            if (count > (size_t(1) << 40)) return refuse("a shape beyond any conditioning");
        }
        if (e == std::string::npos) break;
        k = e + 1;
    }
    const char endian = descr[0], kind = descr[1];
    const int width = std::atoi(descr.c_str() + 2);
    static const std::map<std::string, std::string> kNames = {
        {"f2", "float16"}, {"f4", "float32"}, {"f8", "float64"}, {"i1", "int8"}, {"i2", "int16"}, {"i4", "int32"},
        {"i8", "int64"},   {"u1", "uint8"},   {"u2", "uint16"},  {"u4", "uint32"}, {"u8", "uint64"}, {"b1", "bool"}};
    auto name = kNames.find(descr.substr(1));
    const std::string dtype = name == kNames.end() ? descr : name->second;
    const bool is_float = kind == 'f' && (width == 2 || width == 4 || width == 8) && (endian == '<' || endian == '=' || endian == '>');
    if (count != want || !is_float) {
        why = "the " + what + " has " + std::to_string(count) + " values of " + dtype + "; the conditioning has " +
              std::to_string(want) + " finite floats";
        return {};
    }
    if (order == "True" && count > 1) {
        why = "the " + what + " is stored in Fortran order; omniforge writes C order";
        return {};
    }
    if (data.size() - body != count * size_t(width)) return refuse("its data is not " + std::to_string(count) + " values of " + dtype);
    std::vector<float> out(count);
    std::vector<unsigned char> bytes(data.begin() + long(body), data.end());
    if (endian == '>')  // big-endian: numpy reads it as kind 'f' too
        for (size_t i = 0; i < count; ++i) std::reverse(bytes.begin() + long(i * size_t(width)), bytes.begin() + long((i + 1) * size_t(width)));
    const unsigned char* p = bytes.data();
    for (size_t i = 0; i < count; ++i) {
        if (width == 4) {
            std::memcpy(&out[i], p + 4 * i, 4);
        } else if (width == 8) {
            double v;
            std::memcpy(&v, p + 8 * i, 8);
            out[i] = static_cast<float>(v);
        } else {
            const uint16_t h = uint16_t(p[2 * i] | p[2 * i + 1] << 8);
            const int e = (h >> 10) & 31, m = h & 1023;
            float v = e == 0 ? std::ldexp(float(m), -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 1024), e - 25);
            out[i] = (h & 0x8000) ? -v : v;
        }
    }
    return out;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

struct DecoderImpl {
    std::shared_ptr<BuildImpl> build;
    std::string modality;
    StageSession unet, vae, vocoder;
    StageSession projector;     // {modality}_output_projector; empty name: the build has none
    size_t n_signal = 0, hidden = 0;  // its input: (1, n_signal, hidden) signal hidden states
    bool projector_embeds = false;    // it also reads the signal tokens' input embeddings (NExT-GPT's)
    std::vector<int64_t> latent_shape, cond_shape;  // batch 1
    size_t latent_size = 0, cond_size = 0;
    std::vector<float> uncond;  // the build's unconditional embedding; empty: zeros
    SchedulerConfig sched;
    std::vector<float> table;
    int64_t top[3] = {0, 0, 0};  // max steps per scheduler kind
    float vae_scale = 0.18215f;
    int32_t sample_rate = 0;
};

std::shared_ptr<DecoderImpl> open_decoder(std::shared_ptr<BuildImpl> build, const std::string& modality) {
    check_media_modality(modality, "the decoders generate");
    auto d = std::make_shared<DecoderImpl>();
    d->modality = modality;
    const Manifest& m = build->manifest;
    const std::string unet = modality + "_unet", vae = modality + "_vae_decoder";
    std::vector<std::string> needed{unet, vae};
    if (modality == "audio") needed.push_back("vocoder");
    for (const std::string& s : needed)
        if (!m.stages.count(s) || !m.pipeline.count(s))
            fail(OF_ERR_UNSUPPORTED, "this build cannot generate '" + modality + "': it has no '" + s + "' stage");
    const StageSpec& spec = m.spec(unet);
    const StageDims dims = stage_dims(*build, unet);
    const std::string suffix = ".transformer";
    if (dims.component.size() >= suffix.size() &&
        dims.component.compare(dims.component.size() - suffix.size(), suffix.size(), suffix) == 0)
        fail(OF_ERR_UNSUPPORTED, "the native core decodes UNet decoders; CogVideoX runs in the Python runtime");

    // the configs, checked before any work (Pipeline.check_steps)
    d->sched = SchedulerConfig::from_json(read_config(*build, modality + "_scheduler"));
    d->table = d->sched.table();
    for (SchedulerKind k : {SchedulerKind::ddim, SchedulerKind::euler, SchedulerKind::dpm}) d->top[int(k)] = max_steps(k, d->sched);
    d->vae_scale = vae_scaling(read_config(*build, modality + "_vae"));
    if (modality == "audio") d->sample_rate = m.files.count("vocoder") ? vocoder_rate(read_config(*build, "vocoder")) : 16000;

    // the UNet: sample, timestep and the conditioning, leading with the batch dim; noise_pred out
    const auto& in = spec.io.inputs;
    if (in.size() != 3 || in[0].name != "sample" || in[1].name != "timestep")
        fail(OF_ERR_UNSUPPORTED, "stage '" + unet + "' does not take (sample, timestep, conditioning) as a UNet does");
    for (size_t i = 0; i < 3; ++i)
        if (dims.input_dims[i].empty() || dims.input_dims[i][0] != "batch")
            fail(OF_ERR_UNSUPPORTED, "stage '" + unet + "' input '" + in[i].name + "' does not lead with the 'batch' dim");
    if (in[1].shape.size() != 1) fail(OF_ERR_UNSUPPORTED, "stage '" + unet + "' input 'timestep' is not one value per batch item");
    std::map<std::string, int64_t> sizes = dims.opt;
    sizes["batch"] = 1;
    if (modality == "video") {
        auto it = dims.opt.find("frames");
        if (it == dims.opt.end()) fail(OF_ERR_MANIFEST, "stage 'video_unet' has no 'frames' dim");
        if (it->second < 1 || it->second > kMaxVideoFrames)
            fail(OF_ERR_MANIFEST, "the number of video frames must lie in [1, " + std::to_string(kMaxVideoFrames) + "], got " +
                                      std::to_string(it->second));
    }
    d->latent_shape = concrete(spec, dims, 0, sizes);
    d->cond_shape = concrete(spec, dims, 2, sizes);
    for (const auto* shape : {&d->latent_shape, &d->cond_shape}) {
        double n = 1;
        for (int64_t x : *shape) n *= double(x);
        if (n > double(int64_t(1) << 31))
            fail(OF_ERR_MANIFEST, "stage '" + unet + "' describes latents or a conditioning of " + shape_str(*shape) +
                                      ", beyond the 2^31 values the native decoders hold");
    }
    d->latent_size = product(d->latent_shape);
    d->cond_size = product(d->cond_shape);
    if (modality == "video" && d->latent_shape.size() != 5)
        fail(OF_ERR_UNSUPPORTED, "stage 'video_unet' takes latents of rank " + std::to_string(d->latent_shape.size()) +
                                     "; the video decoder reads (batch, channels, frames, height, width)");

    d->unet = open_stage(build, unet);
    if (std::find(d->unet.outputs.begin(), d->unet.outputs.end(), "noise_pred") == d->unet.outputs.end())
        fail(OF_ERR_UNSUPPORTED, "stage '" + unet + "' has no output 'noise_pred'");
    d->vae = open_stage(build, vae);
    if (d->vae.inputs.size() != 1) fail(OF_ERR_UNSUPPORTED, "stage '" + vae + "' does not take one latent tensor");
    if (modality == "audio") {
        d->vocoder = open_stage(build, "vocoder");
        if (d->vocoder.inputs.size() != 1) fail(OF_ERR_UNSUPPORTED, "stage 'vocoder' does not take one mel tensor");
    }

    // the output projector, when the build has one: signal hidden states (and NExT-GPT's signal
    // token embeddings) -> the conditioning
    const std::string proj = modality + "_output_projector";
    if (m.stages.count(proj) && m.pipeline.count(proj)) {
        const auto& pin = m.spec(proj).io.inputs;
        const auto& pout = m.spec(proj).io.outputs;
        const bool ok = (pin.size() == 1 || pin.size() == 2) && !pout.empty() &&
                        std::all_of(pin.begin(), pin.end(), [&](const TensorSpec& t) {
                            return t.shape.size() == 3 && t.shape[1] > 0 && t.shape[2] > 0 && t.shape[1] == pin[0].shape[1] &&
                                   t.shape[2] == pin[0].shape[2];
                        });
        if (!ok)
            fail(OF_ERR_UNSUPPORTED, "stage '" + proj + "' does not take (batch, signal tokens, hidden) hidden states");
        d->n_signal = size_t(pin[0].shape[1]);
        d->hidden = size_t(pin[0].shape[2]);
        d->projector_embeds = pin.size() == 2;
        d->projector = open_stage(build, proj);
    }

    // the guidance's unconditional input: the build's empty-prompt embedding, else zeros
    const std::string role = modality + "_uncond";
    if (auto it = m.files.find(role); it != m.files.end()) {
        std::string why;
        const std::string what = modality + " unconditional embedding";
        d->uncond = read_npy(read_verified(build->folder, m, it->second), what, d->cond_size, why);
        if (why.empty() && !all_finite(d->uncond.data(), d->uncond.size()))
            why = "the " + what + " has " + std::to_string(d->cond_size) + " values of float32; the conditioning has " +
                  std::to_string(d->cond_size) + " finite floats";
        if (!why.empty()) fail(OF_ERR_MANIFEST, why);
    }
    d->build = std::move(build);
    return d;
}

const std::string& decoder_modality(const DecoderImpl& d) { return d.modality; }
const std::vector<int64_t>& decoder_latent_shape(const DecoderImpl& d) { return d.latent_shape; }
const std::vector<int64_t>& decoder_conditioning_shape(const DecoderImpl& d) { return d.cond_shape; }

std::pair<size_t, size_t> conditioning_input(const DecoderImpl& d) { return {d.n_signal, d.hidden}; }

void conditioning(DecoderImpl& d, LlmImpl* llm, const float* hidden, size_t n_hidden, float* cond, size_t n_cond) {
    const std::string& mod = d.modality;
    if (d.projector.name.empty()) fail(OF_ERR_UNSUPPORTED, "this build has no '" + mod + "_output_projector' stage");
    if (!hidden) fail(OF_ERR_INVALID_ARGUMENT, "the signal hidden states are a null pointer");
    if (!cond) fail(OF_ERR_INVALID_ARGUMENT, "the conditioning buffer is a null pointer");
    if (n_cond != d.cond_size)
        fail(OF_ERR_INVALID_ARGUMENT, "the conditioning buffer must hold " + std::to_string(d.cond_size) + " floats (shape " +
                                          shape_str(d.cond_shape) + "), got " + std::to_string(n_cond));
    const size_t want = d.n_signal * d.hidden;
    if (n_hidden != want)
        fail(OF_ERR_INPUT, "the " + mod + " output projector takes " + std::to_string(d.n_signal) + " signal hidden states of " +
                               std::to_string(d.hidden) + " floats (" + std::to_string(want) + "), got " + std::to_string(n_hidden) + " floats");
    if (!all_finite(hidden, n_hidden)) fail(OF_ERR_INPUT, "the " + mod + " signal hidden states hold NaN or infinite values");
    const std::vector<int64_t> shape{1, int64_t(d.n_signal), int64_t(d.hidden)};
    std::vector<float> embeds;
    std::vector<std::pair<const float*, std::vector<int64_t>>> feeds{{hidden, shape}};
    if (d.projector_embeds) {  // Pipeline.conditioning: the signal tokens' input embeddings too
        if (!llm)
            fail(OF_ERR_INVALID_ARGUMENT, "the " + mod + " output projector also reads the signal tokens' input embeddings: pass the LLM handle");
        const std::vector<int32_t> ids = signal_token_ids(*llm, mod);
        if (ids.size() != d.n_signal)
            fail(OF_ERR_MANIFEST, "the build lists " + std::to_string(ids.size()) + " " + mod + " signal tokens; its output projector reads " +
                                      std::to_string(d.n_signal));
        int32_t h = 0, ctx = 0;
        llm_geometry(*llm, &h, &ctx);
        if (size_t(h) != d.hidden)
            fail(OF_ERR_INVALID_ARGUMENT, "the LLM's rows are " + std::to_string(h) + " wide; the " + mod + " output projector reads " +
                                              std::to_string(d.hidden));
        embeds = embed_tokens(*llm, ids);
        feeds.push_back({embeds.data(), shape});
    }
    std::vector<int64_t> out_shape;
    std::vector<float> out = run_stage(d.projector, feeds, out_shape);
    if (out.size() != d.cond_size)
        fail(OF_ERR_ENGINE, "stage '" + d.projector.name + "' gave " + shape_str(out_shape) + "; the " + mod + " UNet reads a conditioning of " +
                                shape_str(d.cond_shape));
    std::copy(out.begin(), out.end(), cond);
}

namespace {

// DiffusionConfig's checks, then the scheduler's step range: the scheduler, set up
Scheduler checked_scheduler(const DecoderImpl& d, const DecodeParams& p) {
    if (p.steps < 1) fail(OF_ERR_INVALID_ARGUMENT, "steps must be >= 1, got " + std::to_string(p.steps));
    const double g = p.guidance_scale;
    if (!std::isfinite(g) || !(0 <= g && g <= kMaxGuidance))
        fail(OF_ERR_INVALID_ARGUMENT, "guidance scale must be >= 0 and finite, at most 1000, got " + number(g));
    const SchedulerKind kind = scheduler_kind(p.scheduler);
    Scheduler sched(kind, d.sched, d.table, d.top[int(kind)]);
    sched.set_timesteps(p.steps);
    return sched;
}

}  // namespace

void check_decode(const DecoderImpl& d, const DecodeParams& p) { checked_scheduler(d, p); }

MediaOut decode(DecoderImpl& d, const float* cond, size_t n_cond, const float* uncond, const float* latents, size_t n_latents,
                const DecodeParams& p) {
    const std::string& mod = d.modality;
    const double g = p.guidance_scale;
    Scheduler sched = checked_scheduler(d, p);
    if (!cond) fail(OF_ERR_INVALID_ARGUMENT, "the conditioning is a null pointer");
    if (n_cond != d.cond_size)
        fail(OF_ERR_INPUT, "the " + mod + " conditioning must hold " + std::to_string(d.cond_size) + " floats (shape " +
                               shape_str(d.cond_shape) + "), got " + std::to_string(n_cond));
    if (!all_finite(cond, n_cond)) fail(OF_ERR_INPUT, "the " + mod + " conditioning holds NaN or infinite values");
    if (uncond && !all_finite(uncond, n_cond)) fail(OF_ERR_INPUT, "the " + mod + " unconditional input holds NaN or infinite values");
    const size_t L = d.latent_size;
    std::vector<float> x(L);
    if (latents) {
        if (n_latents != L)
            fail(OF_ERR_INPUT, mod + " latents must have shape " + shape_str(d.latent_shape) + " (" + std::to_string(L) + " floats), got " +
                                   std::to_string(n_latents) + " floats");
        if (!all_finite(latents, L)) fail(OF_ERR_INPUT, mod + " latents hold NaN or infinite values");
        std::copy(latents, latents + L, x.begin());
    } else {
        if (n_latents != 0) fail(OF_ERR_INVALID_ARGUMENT, "n_latents is " + std::to_string(n_latents) + " but the latents are a null pointer");
        // seeded unit-variance noise as Pipeline.initial_latents draws it:
        // default_rng(seed).standard_normal(shape).astype(float32)
        Rng rng(p.seed);
        for (size_t i = 0; i < L; ++i) x[i] = static_cast<float>(rng.standard_normal());
    }
    const auto t0 = std::chrono::steady_clock::now();
    const float sigma0 = static_cast<float>(sched.init_noise_sigma());
    for (float& v : x) v = v * sigma0;

    const bool guided = g > 1.0;
    const size_t B = guided ? 2 : 1, C = d.cond_size;
    std::vector<float> context(B * C);
    if (guided) {
        if (uncond) std::copy(uncond, uncond + C, context.begin());
        else if (!d.uncond.empty()) std::copy(d.uncond.begin(), d.uncond.end(), context.begin());
        // else zeros
        std::copy(cond, cond + C, context.begin() + long(C));
    } else {
        std::copy(cond, cond + C, context.begin());
    }
    std::vector<int64_t> x_shape = d.latent_shape, c_shape = d.cond_shape;
    x_shape[0] = c_shape[0] = int64_t(B);
    const std::vector<int64_t> t_shape{int64_t(B)};
    std::vector<float> x_in(B * L), ts(B);
    const float gs = static_cast<float>(g);
    const std::vector<double>& steps = sched.timesteps();
    for (size_t i = 0; i < steps.size(); ++i) {
        sched.scale_model_input(x.data(), x_in.data(), L, i);
        if (guided) std::copy(x_in.begin(), x_in.begin() + long(L), x_in.begin() + long(L));
        std::fill(ts.begin(), ts.end(), static_cast<float>(steps[i]));
        std::vector<int64_t> eps_shape;
        std::vector<float> eps = run_stage(d.unet, {{x_in.data(), x_shape}, {ts.data(), t_shape}, {context.data(), c_shape}}, eps_shape,
                                           "noise_pred");
        if (eps.size() != B * L) fail(OF_ERR_ENGINE, "stage '" + d.unet.name + "' gave " + shape_str(eps_shape) + " for latents of " + shape_str(x_shape));
        if (guided)
            for (size_t k = 0; k < L; ++k) eps[k] = eps[k] + gs * (eps[L + k] - eps[k]);
        sched.step(eps.data(), i, x.data(), L);
    }
    MediaOut out;
    out.kind = mod;
    out.denoise_s = seconds_since(t0);
    const auto t1 = std::chrono::steady_clock::now();

    // the VAE decoder: latents / scaling_factor
    std::vector<int64_t> vae_in_shape = d.latent_shape;
    std::vector<float> z(L);
    if (mod == "video") {  // (1, C, F, h, w) -> (F, C, h, w): the frames as a batch
        const int64_t ch = d.latent_shape[1], fr = d.latent_shape[2], hw = d.latent_shape[3] * d.latent_shape[4];
        for (int64_t c = 0; c < ch; ++c)
            for (int64_t f = 0; f < fr; ++f)
                for (int64_t k = 0; k < hw; ++k) z[size_t((f * ch + c) * hw + k)] = x[size_t((c * fr + f) * hw + k)] / d.vae_scale;
        vae_in_shape = {fr, ch, d.latent_shape[3], d.latent_shape[4]};
    } else {
        for (size_t k = 0; k < L; ++k) z[k] = x[k] / d.vae_scale;
    }
    std::vector<int64_t> vs;
    std::vector<float> decoded = run_stage(d.vae, {{z.data(), vae_in_shape}}, vs);
    if (mod == "audio") {  // (1, C, T, M)[:, 0] -> the vocoder's mel (1, T, M) -> waveform[0]
        if (vs.size() != 4 || vs[0] < 1 || vs[1] < 1)
            fail(OF_ERR_ENGINE, "stage '" + d.vae.name + "' gave " + shape_str(vs) + "; the vocoder reads (batch, 1, frames, mels)");
        std::vector<float> mel;
        const size_t plane = size_t(vs[2] * vs[3]);
        for (int64_t b = 0; b < vs[0]; ++b)
            mel.insert(mel.end(), decoded.begin() + long(size_t(b) * size_t(vs[1]) * plane),
                       decoded.begin() + long(size_t(b) * size_t(vs[1]) * plane + plane));
        std::vector<int64_t> ws;
        std::vector<float> wav = run_stage(d.vocoder, {{mel.data(), {vs[0], vs[2], vs[3]}}}, ws,
                                           std::find(d.vocoder.outputs.begin(), d.vocoder.outputs.end(), "waveform") != d.vocoder.outputs.end()
                                               ? "waveform"
                                               : "");
        if (ws.size() != 2 || ws[0] < 1) fail(OF_ERR_ENGINE, "stage 'vocoder' gave " + shape_str(ws) + "; a waveform is (batch, samples)");
        out.data.assign(wav.begin(), wav.begin() + long(ws[1]));
        out.shape = {ws[1]};
        out.sample_rate = d.sample_rate;
    } else {  // clip(x / 2 + 0.5, 0, 1), channels last: image (H, W, C), video (F, H, W, C)
        if (vs.size() != 4 || vs[0] < 1)
            fail(OF_ERR_ENGINE, "stage '" + d.vae.name + "' gave " + shape_str(vs) + "; images are (batch, channels, height, width)");
        const int64_t n = mod == "image" ? 1 : vs[0], ch = vs[1], hw = vs[2] * vs[3];
        out.data.resize(size_t(n * ch * hw));
        for (int64_t f = 0; f < n; ++f)
            for (int64_t c = 0; c < ch; ++c)
                for (int64_t k = 0; k < hw; ++k) {
                    const float v = decoded[size_t((f * ch + c) * hw + k)] / 2.0f + 0.5f;
                    out.data[size_t((f * hw + k) * ch + c)] = std::min(std::max(v, 0.0f), 1.0f);
                }
        out.shape = {vs[2], vs[3], ch};
        if (mod == "video") out.shape.insert(out.shape.begin(), n);
    }
    out.decode_s = seconds_since(t1);
    return out;
}

}  // namespace omniforge
