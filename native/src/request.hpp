// The whole any-to-any request in one call (request.cpp), over a build's LLM and the encoders and
// decoders it opens on first use.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "internal.hpp"

namespace omniforge {

struct RgbView;

struct PipelineImpl {
    PipelineImpl(std::shared_ptr<BuildImpl> build, int32_t num_slots, int32_t max_context);
    ~PipelineImpl();
    PipelineImpl(const PipelineImpl&) = delete;
    PipelineImpl& operator=(const PipelineImpl&) = delete;
    EncoderImpl& encoder(const std::string& modality);  // opened on first use; shared by requests
    DecoderImpl& decoder(const std::string& modality);

    std::shared_ptr<BuildImpl> build;
    LlmImpl* llm = nullptr;
    std::mutex mutex;  // guards the maps, not the stages (their calls are thread-safe)
    std::map<std::string, std::shared_ptr<EncoderImpl>> encoders;
    std::map<std::string, std::shared_ptr<DecoderImpl>> decoders;
};

struct RequestIn {
    std::string prompt;
    const RgbView* image = nullptr;  // one image, or none
    const float* audio = nullptr;    // a recording's mono samples, or none
    size_t n_audio = 0;
    int32_t audio_rate = 0;
    const RgbView* frames = nullptr;  // a video's picked frames, or none
    size_t n_frames = 0;
    const float* track = nullptr;  // the video's sound track (mono samples), or none
    size_t n_track = 0;
    int32_t track_rate = 0;
    std::vector<std::string> force;                                     // modalities generated regardless
    std::map<std::string, std::pair<const float*, size_t>> latents;  // a modality's initial noise
};

struct RequestOut {
    GenerateOutput gen;
    std::vector<MediaOut> media;  // image, video, audio: those the reply asked for or the request forced
};

// Pipeline.run(prompt, image=, audio=, video=, force=, latents=, adapter="none").
RequestOut run_request(PipelineImpl& p, const RequestIn& r, GenerateParams gen, const DecodeParams& dec);

}  // namespace omniforge
