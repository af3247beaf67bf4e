// The audio front ends in C++: what the Python runtime computes from a recording's samples before
// the audio encoder (its log-mel, ImageBind's, Whisper's and CLAP's front ends), in float64 as it
// does, with FFTW for the Fourier transforms.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace omniforge {

// A build's audio_frontend.json, checked as the Python runtime reads it.
struct AudioFrontEnd {
    enum class Kind { LogMel, ImageBind, Whisper, Clap } kind = Kind::LogMel;
    // LogMel: media.AudioFrontEnd
    int64_t sample_rate = 16000, n_fft = 400, hop_length = 160, num_frames = 0;
    double mean = 0.0, std = 1.0;
    int64_t n_mels = 80;  // every kind
    // ImageBind: imagebind_media.audio_clips; Whisper: whisper_media.log_mel
    int64_t clips = 3, target_frames = 204, window_s = 30;
    // Clap: clap_media.ClapFrontEnd (sample_rate, n_fft, hop_length, n_mels above)
    double f_min = 0.0, f_max = 14000.0, max_length_s = 10.0;
    std::string padding = "repeatpad";
    bool fusion = true;  // truncation "fusion" (else "rand_trunc")

    static AudioFrontEnd from_config(const nlohmann::json& cfg);
};

// Mono float samples at `sample_rate` -> the audio encoder's batch as Pipeline.encode_audio makes
// it from a recording (only the seconds the front end reads are used). `shape` gets its shape.
std::vector<float> audio_items(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sample_rate,
                               std::vector<int64_t>& shape);

}  // namespace omniforge
