// The whole any-to-any request in one call, as the Python runtime's Pipeline.run makes it: media in
// (pixels, samples, a video's frames) through the front ends, encoders and input projectors; the
// prompt laid out with them and generated; then each modality the reply asks for (or the request
// forces) from its signal tokens' hidden states through the output projector and the decoder.
#include "request.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "config_values.hpp"
#include "image_frontend.hpp"
#include "stage_session.hpp"

namespace omniforge {

namespace {

const char* const kModalities[] = {"image", "video", "audio"};  // the order media come out in

bool has_stage(const BuildImpl& b, const std::string& stage) { return b.manifest.stages.count(stage) > 0; }

size_t signal_count(const LlmImpl& llm, const std::string& modality) {  // 0 for a modality without signal tokens
    try {
        return signal_token_ids(llm, modality).size();
    } catch (const Error&) {
        return 0;
    }
}

// video_audio.VideoAudio: how a video's frame rows and its sound track's rows are fused
struct VideoAudio {
    bool mean = false;  // else concat
    float weight = 0.5f;
};

VideoAudio read_video_audio(const BuildImpl& b) {
    VideoAudio va;
    if (!b.manifest.files.count("video_audio")) return va;  // a track is concatenated
    const nlohmann::json cfg = read_config(b, "video_audio");
    if (!cfg.is_object()) fail(OF_ERR_MANIFEST, "video_audio must be an object with 'fusion' and 'weight', got " + py_shown(cfg));
    std::vector<std::string> unknown;
    for (const auto& [key, value] : cfg.items())
        if (key != "fusion" && key != "weight") unknown.push_back("'" + key + "'");
    if (!unknown.empty()) {
        std::string list;
        for (const std::string& k : unknown) list += (list.empty() ? "" : ", ") + k;
        fail(OF_ERR_MANIFEST, "video_audio has unknown keys [" + list + "] (it takes 'fusion' and 'weight')");
    }
    const nlohmann::json fusion = cfg.value("fusion", nlohmann::json("concat"));
    if (fusion != "concat" && fusion != "mean")
        fail(OF_ERR_MANIFEST, "video_audio fusion must be one of concat, mean, got " + py_shown(fusion));
    const nlohmann::json w = cfg.value("weight", nlohmann::json(0.5));
    if (!w.is_number() || !std::isfinite(w.get<double>()) || w.get<double>() < 0 || w.get<double>() > 1)
        fail(OF_ERR_MANIFEST, "video_audio weight must be a number in [0, 1], got " + py_shown(w));
    va.mean = fusion == "mean";
    va.weight = static_cast<float>(w.get<double>());
    return va;
}

}  // namespace

PipelineImpl::PipelineImpl(std::shared_ptr<BuildImpl> b, int32_t num_slots, int32_t max_context) : build(std::move(b)) {
    llm = open_llm(build, num_slots, max_context);
}

PipelineImpl::~PipelineImpl() { close_llm(llm); }

EncoderImpl& PipelineImpl::encoder(const std::string& modality) {
    std::lock_guard<std::mutex> lock(mutex);
    auto& e = encoders[modality];
    if (!e) e = open_encoder(build, modality);
    return *e;
}

DecoderImpl& PipelineImpl::decoder(const std::string& modality) {
    std::lock_guard<std::mutex> lock(mutex);
    auto& d = decoders[modality];
    if (!d) d = open_decoder(build, modality);
    return *d;
}

RequestOut run_request(PipelineImpl& p, const RequestIn& r, GenerateParams gen, const DecodeParams& dec) {
    LlmImpl& llm = *p.llm;
    for (const std::string& m : r.force) check_media_modality(m, "a request can force");
    for (const auto& [m, latents] : r.latents) check_media_modality(m, "latents are given for");
    if (r.track && !r.frames) fail(OF_ERR_INPUT, "a video's sound track was given without a video");
    // the modalities the build can produce (Pipeline.modalities_in), and a forced one's decoder
    // parameters checked before any work (Pipeline.check_steps)
    std::vector<std::string> out_modalities;
    for (const char* m : kModalities)
        if (has_stage(*p.build, std::string(m) + "_output_projector")) out_modalities.push_back(m);
    for (const std::string& m : r.force)
        if (std::find(out_modalities.begin(), out_modalities.end(), m) != out_modalities.end()) check_decode(p.decoder(m), dec);

    // media in, in Pipeline.run's order: image, audio, video
    int32_t width = 0, max_context = 0;
    llm_geometry(llm, &width, &max_context);
    std::vector<std::vector<float>> rows_of;
    std::vector<MediaItem> items;
    auto add = [&](const std::string& modality, EncoderImpl& e, auto&& run) {
        size_t n_rows = 0, w = 0;
        encoder_rows(e, &n_rows, &w);
        rows_of.emplace_back(n_rows * w);
        run(e, rows_of.back().data(), rows_of.back().size());
        items.push_back({modality, rows_of.back().data(), n_rows});
    };
    rows_of.reserve(3);
    if (r.image)
        add("image", p.encoder("image"), [&](EncoderImpl& e, float* out, size_t n) { encode_images(e, r.image, 1, out, n); });
    if (r.audio)
        add("audio", p.encoder("audio"),
            [&](EncoderImpl& e, float* out, size_t n) { encode_audio(e, r.audio, r.n_audio, r.audio_rate, out, n); });
    if (r.frames && !r.track)
        add("video", p.encoder("video"), [&](EncoderImpl& e, float* out, size_t n) { encode_images(e, r.frames, r.n_frames, out, n); });
    if (r.frames && r.track) {  // the frames' rows and the track's, fused as the build's video_audio says
        const VideoAudio va = read_video_audio(*p.build);
        EncoderImpl& ve = p.encoder("video");
        EncoderImpl& ae = p.encoder("audio");
        size_t nv = 0, na = 0, w = 0;
        encoder_rows(ve, &nv, &w);
        encoder_rows(ae, &na, &w);
        std::vector<float> frames(nv * w), track(na * w);
        encode_images(ve, r.frames, r.n_frames, frames.data(), frames.size());
        encode_audio(ae, r.track, r.n_track, r.track_rate, track.data(), track.size());
        if (va.mean && nv != na)
            fail(OF_ERR_INPUT, "video_audio fusion 'mean' needs as many rows from the frames (" + std::to_string(nv) +
                                   ") as from the track (" + std::to_string(na) + ")");
        if (va.mean) {
            for (size_t i = 0; i < frames.size(); ++i) frames[i] = (1.0f - va.weight) * frames[i] + va.weight * track[i];
        } else {
            frames.insert(frames.end(), track.begin(), track.end());
            nv += na;
        }
        rows_of.push_back(std::move(frames));
        items.push_back({"video", rows_of.back().data(), nv});
    }

    PreparedPrompt prepared = prepare_prompt(llm, r.prompt, items);
    if (gen.stop_strings.empty()) gen.stop_strings = prepared.stop_strings;  // the protocol's
    // Pipeline._reserve_signal_room: a forced modality's signal tokens must fit after the prompt,
    // and after the generated text
    if (!r.force.empty()) {
        std::vector<std::string> forced = r.force;
        std::sort(forced.begin(), forced.end());
        size_t most = 0;
        std::string most_of = forced.front();
        for (const std::string& m : forced)
            if (signal_count(llm, m) > most) most = signal_count(llm, m), most_of = m;
        const size_t fed = prepared.n + most;
        if (fed >= size_t(max_context))
            fail(OF_ERR_CONTEXT_LENGTH, "the prompt (" + std::to_string(prepared.n) + " tokens) followed by the " + std::to_string(most) +
                                            " signal tokens of forced " + most_of + " is " + std::to_string(fed) +
                                            " tokens fed to the LLM; the context holds " + std::to_string(max_context) +
                                            ", leaving no room for a new token");
        const int64_t room = int64_t(max_context) - 1 - int64_t(fed);
        if (room < gen.max_new_tokens) gen.max_new_tokens = int32_t(std::max<int64_t>(1, room));
    }
    gen.collect_signal_hidden = true;
    RequestOut out;
    out.gen = generate_rows(llm, prepared.rows, prepared.n, prepared.ids, gen);

    // the modalities the reply asks for: with a protocol (NExT-GPT's) where a modality's first
    // signal token appears, else any of its signal tokens
    const bool protocol = has_protocol(llm);
    for (const std::string& m : out_modalities) {
        const bool forced = std::find(r.force.begin(), r.force.end(), m) != r.force.end();
        const std::vector<int32_t> ids = signal_token_ids(llm, m);
        const bool emitted = std::any_of(out.gen.tokens.begin(), out.gen.tokens.end(), [&](int32_t t) {
            return protocol ? t == ids.front() : std::find(ids.begin(), ids.end(), t) != ids.end();
        });
        if (!forced && !emitted) continue;
        const std::vector<float> hidden = signal_hidden(llm, out.gen, m, gen.slot_wait_ms);
        DecoderImpl& d = p.decoder(m);
        std::vector<float> cond(product(decoder_conditioning_shape(d)));
        conditioning(d, &llm, hidden.data(), hidden.size(), cond.data(), cond.size());
        auto given = r.latents.find(m);
        const float* latents = given == r.latents.end() ? nullptr : given->second.first;
        const size_t n_latents = given == r.latents.end() ? 0 : given->second.second;
        out.media.push_back(decode(d, cond.data(), cond.size(), nullptr, latents, n_latents, dec));
    }
    return out;
}

}  // namespace omniforge
