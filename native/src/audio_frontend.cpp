// The audio front ends (audio_frontend.hpp): the default log-mel (media.audio_features), ImageBind's
// clips of Kaldi fbank features (imagebind_media.audio_clips) and Whisper's log-mel
// (whisper_media.log_mel) and CLAP's (clap_media.features), each from mono samples at any rate, in
// the Python runtime's float64 arithmetic. The Fourier transforms are FFTW's; its planner is not thread-safe, so plans are made
// and destroyed under one lock, and executed without it.
#include "audio_frontend.hpp"

#include <fftw3.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>

#include "config_values.hpp"
#include "internal.hpp"
#include "schedulers.hpp"

namespace omniforge {

using json = nlohmann::json;

namespace {

constexpr int64_t kMinRate = 1000, kMaxRate = 384000;  // media.MIN_SAMPLE_RATE, MAX_SAMPLE_RATE
constexpr int64_t kMaxFft = 1 << 16, kMaxMelBins = 1024, kMaxMelFrames = 100000, kMaxMelWork = 1 << 22;
constexpr int64_t kMaxAudioSamples = 1 << 24;  // media.MAX_AUDIO_SAMPLES
constexpr int64_t kMaxClips = 64;              // imagebind_media.MAX_CLIPS
constexpr int64_t kMaxResampleTable = 1 << 24;  // imagebind_media.MAX_RESAMPLE_TABLE
constexpr int64_t kImageBindRate = 16000, kWhisperRate = 16000;
constexpr double kImageBindLongestS = 3600.0;  // pipeline.IB_LONGEST_S
constexpr float kImageBindMean = -4.268f, kImageBindStd = 9.138f;
constexpr double kPi = 3.14159265358979323846;

std::mutex& planner_lock() {
    static std::mutex m;
    return m;
}

// FFTW buffers and a plan over them, made and destroyed under the planner lock.
class Fft {
public:
    // forward: n real points -> n / 2 + 1 bins; inverse: the bins -> n real points (unnormalised)
    Fft(size_t n, bool inverse) : n_(n) {
        real_ = fftw_alloc_real(n);
        bins_ = fftw_alloc_complex(n / 2 + 1);
        if (!real_ || !bins_) {
            release();
            fail(OF_ERR_OUT_OF_MEMORY, "the audio front end could not allocate a " + std::to_string(n) + "-point transform");
        }
        std::lock_guard<std::mutex> lock(planner_lock());
        plan_ = inverse ? fftw_plan_dft_c2r_1d(int(n), bins_, real_, FFTW_ESTIMATE)
                        : fftw_plan_dft_r2c_1d(int(n), real_, bins_, FFTW_ESTIMATE);
        if (!plan_) {
            release();
            fail(OF_ERR_ENGINE, "FFTW could not plan a " + std::to_string(n) + "-point transform");
        }
    }
    Fft(const Fft&) = delete;
    Fft& operator=(const Fft&) = delete;
    ~Fft() { release(); }
    double* real() { return real_; }
    fftw_complex* bins() { return bins_; }
    void run() { fftw_execute(plan_); }
    // |rfft(frame zero-padded to n)|^2 into power[0 .. n / 2]
    void power(const double* frame, size_t len, double* power) {
        std::copy(frame, frame + len, real_);
        std::fill(real_ + len, real_ + n_, 0.0);
        run();
        for (size_t k = 0; k <= n_ / 2; ++k) power[k] = bins_[k][0] * bins_[k][0] + bins_[k][1] * bins_[k][1];
    }

private:
    void release() {
        std::lock_guard<std::mutex> lock(planner_lock());
        if (plan_) fftw_destroy_plan(plan_);
        plan_ = nullptr;
        if (real_) fftw_free(real_);
        if (bins_) fftw_free(bins_);
        real_ = nullptr;
        bins_ = nullptr;
    }
    size_t n_;
    double* real_ = nullptr;
    fftw_complex* bins_ = nullptr;
    fftw_plan plan_ = nullptr;
};

void check_rate(int64_t sr, const std::string& what) {
    if (sr < kMinRate || sr > kMaxRate)
        fail(OF_ERR_INPUT, what + " " + std::to_string(sr) + " Hz is outside " + std::to_string(kMinRate) + " to " +
                               std::to_string(kMaxRate) + " Hz");
}

// numpy's reflect padding by `pad` on both sides (pad < x.size())
std::vector<double> reflect(const std::vector<double>& x, size_t pad) {
    std::vector<double> out(x.size() + 2 * pad);
    for (size_t i = 0; i < pad; ++i) out[i] = x[pad - i];
    std::copy(x.begin(), x.end(), out.begin() + long(pad));
    for (size_t i = 0; i < pad; ++i) out[pad + x.size() + i] = x[x.size() - 2 - i];
    return out;
}

// media.resample: band-limited through the spectrum (the signal taken as periodic)
std::vector<float> resample_spectral(const std::vector<double>& x, int64_t sr_in, int64_t sr_out) {
    check_rate(sr_in, "the input sample rate");
    check_rate(sr_out, "the output sample rate");
    if (x.empty()) fail(OF_ERR_INPUT, "there are no samples to resample");
    if (sr_in == sr_out) return std::vector<float>(x.begin(), x.end());
    const size_t n = x.size();
    const size_t n_out = std::max<size_t>(1, size_t(std::nearbyint(double(n) * double(sr_out) / double(sr_in))));
    Fft fwd(n, false);
    std::copy(x.begin(), x.end(), fwd.real());
    fwd.run();
    Fft inv(n_out, true);
    const size_t keep = std::min(n / 2 + 1, n_out / 2 + 1);
    for (size_t k = 0; k <= n_out / 2; ++k) {
        inv.bins()[k][0] = k < keep ? fwd.bins()[k][0] : 0.0;
        inv.bins()[k][1] = k < keep ? fwd.bins()[k][1] : 0.0;
    }
    inv.run();
    std::vector<float> out(n_out);
    const double scale = double(n_out) / double(n);
    for (size_t i = 0; i < n_out; ++i) out[i] = static_cast<float>(inv.real()[i] / double(n_out) * scale);
    return out;
}

// power spectra of `frames` frames of `padded` (hop apart, `window` applied, zero-padded to n_fft),
// multiplied by the (bins, n_mels) filter bank: (frames, n_mels)
std::vector<double> mel_power(const std::vector<double>& padded, size_t frames, size_t hop, const std::vector<double>& window,
                              size_t n_fft, const std::vector<double>& bank, size_t n_mels) {
    const size_t bins = n_fft / 2 + 1, len = window.size();
    Fft fft(n_fft, false);
    std::vector<double> frame(len), power(bins), mel(frames * n_mels, 0.0);
    for (size_t f = 0; f < frames; ++f) {
        for (size_t k = 0; k < len; ++k) frame[k] = padded[f * hop + k] * window[k];
        fft.power(frame.data(), len, power.data());
        double* row = &mel[f * n_mels];
        for (size_t k = 0; k < bins; ++k)
            for (size_t m = 0; m < n_mels; ++m) row[m] += power[k] * bank[k * n_mels + m];
    }
    return mel;
}

std::vector<double> periodic_hann(size_t n) {
    std::vector<double> w(n);
    for (size_t k = 0; k < n; ++k) w[k] = 0.5 - 0.5 * std::cos(2 * kPi * double(k) / double(n));
    return w;
}

// ---- the default front end: media.log_mel, media.audio_features -----------------------------------
// (bins, n_mels) triangular filters with corners `edges` (n_mels + 2 frequencies) over the bin
// frequencies linspace(0, top, bins), with Slaney's area normalisation when `normalize`
std::vector<double> triangles(double top, size_t bins, const std::vector<double>& edges, size_t n_mels, bool normalize) {
    const std::vector<double> freqs = linspace(0, top, int64_t(bins));
    std::vector<double> bank(bins * n_mels);
    for (size_t k = 0; k < bins; ++k)
        for (size_t m = 0; m < n_mels; ++m) {
            const double up = (freqs[k] - edges[m]) / (edges[m + 1] - edges[m]);
            const double down = (edges[m + 2] - freqs[k]) / (edges[m + 2] - edges[m + 1]);
            const double v = std::max(0.0, std::min(up, down));
            bank[k * n_mels + m] = normalize ? v * (2.0 / (edges[m + 2] - edges[m])) : v;
        }
    return bank;
}

// n_mels + 2 corners evenly spaced on HTK's mel scale, 2595 log10(1 + f / 700)
std::vector<double> htk_edges(double f_min, double f_max, size_t n_mels) {
    auto to_mel = [](double f) { return 2595.0 * std::log10(1.0 + f / 700.0); };
    std::vector<double> e = linspace(to_mel(f_min), to_mel(f_max), int64_t(n_mels + 2));
    for (double& m : e) m = 700.0 * (std::pow(10.0, m / 2595.0) - 1.0);
    return e;
}

// ... on Slaney's mel scale: linear below 1 kHz, logarithmic above
std::vector<double> slaney_edges(double f_min, double f_max, size_t n_mels) {
    auto to_mel = [](double f) { return f >= 1000.0 ? 15.0 + std::log(std::max(f, 1e-10) / 1000.0) * 27.0 / std::log(6.4) : 3.0 * f / 200.0; };
    auto to_hz = [](double m) { return m >= 15.0 ? 1000.0 * std::exp(std::log(6.4) / 27.0 * (m - 15.0)) : 200.0 * m / 3.0; };
    std::vector<double> e = linspace(to_mel(f_min), to_mel(f_max), int64_t(n_mels + 2));
    for (double& m : e) m = to_hz(m);
    return e;
}

std::vector<double> htk_bank(int64_t sr, size_t n_fft, size_t n_mels) {  // media.mel_filterbank
    return triangles(double(sr) / 2, n_fft / 2 + 1, htk_edges(0.0, double(sr) / 2, n_mels), n_mels, false);
}

std::vector<float> default_features(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sr, std::vector<int64_t>& shape) {
    std::vector<double> x(samples, samples + n);
    const std::vector<float> y = resample_spectral(x, sr, fe.sample_rate);
    x.assign(y.begin(), y.end());
    const size_t n_fft = size_t(fe.n_fft), half = n_fft / 2, hop = size_t(fe.hop_length), n_mels = size_t(fe.n_mels);
    if (x.size() <= half) x.resize(half + 1, 0.0);
    const std::vector<double> padded = reflect(x, half);
    const size_t frames = 1 + (padded.size() - n_fft) / hop;
    const std::vector<double> mel = mel_power(padded, frames, hop, periodic_hann(n_fft), n_fft, htk_bank(fe.sample_rate, n_fft, n_mels), n_mels);
    const size_t want = size_t(fe.num_frames);
    const float pad = static_cast<float>(std::log(1e-10)), mean = static_cast<float>(fe.mean), std_ = static_cast<float>(fe.std);
    std::vector<float> out(n_mels * want);
    for (size_t m = 0; m < n_mels; ++m)
        for (size_t t = 0; t < want; ++t) {
            const float v = t < frames ? static_cast<float>(std::log(std::max(mel[t * n_mels + m], 1e-10))) : pad;
            out[m * want + t] = (v - mean) / std_;
        }
    shape = {1, 1, fe.n_mels, fe.num_frames};
    return out;
}

// ---- ImageBind: imagebind_media.resample_sinc, kaldi_fbank, audio_clips ---------------------------
std::vector<float> resample_sinc(const std::vector<double>& x, int64_t sr_in, int64_t sr_out) {
    check_rate(sr_in, "the input sample rate");
    check_rate(sr_out, "the output sample rate");
    if (sr_in == sr_out) return std::vector<float>(x.begin(), x.end());
    const int64_t g = std::gcd(sr_in, sr_out), orig = sr_in / g, nw = sr_out / g;
    const double lowpass = 6.0, base = double(std::min(orig, nw)) * 0.99;
    const int64_t width = int64_t(std::ceil(6.0 * double(orig) / base));
    const int64_t taps = 2 * width + orig;
    if (nw * taps > kMaxResampleTable)
        fail(OF_ERR_INPUT, "resampling " + std::to_string(sr_in) + " Hz to " + std::to_string(sr_out) + " Hz needs a " +
                               std::to_string(nw) + "x" + std::to_string(taps) +
                               " sinc table; convert the audio to a common rate (e.g. 48000 or 44100 Hz) first");
    std::vector<double> kernel(size_t(nw * taps));
    for (int64_t j = 0; j < nw; ++j)
        for (int64_t k = 0; k < taps; ++k) {
            double t = (double(-j) / double(nw) + double(k - width) / double(orig)) * base;
            t = std::min(std::max(t, -lowpass), lowpass);
            const double c = std::cos(t * kPi / lowpass / 2);
            t = t * kPi;
            kernel[size_t(j * taps + k)] = (t == 0 ? 1.0 : std::sin(t) / t) * (c * c) * (base / double(orig));
        }
    const int64_t n = int64_t(x.size());
    std::vector<double> padded(size_t(n + 2 * width + orig), 0.0);
    std::copy(x.begin(), x.end(), padded.begin() + width);
    // torchaudio takes the ceiling of a float32 of new * length / orig
    const size_t target = size_t(std::ceil(static_cast<float>(double(nw * n) / double(orig))));
    std::vector<float> out;
    out.reserve(target);
    for (int64_t i = 0; i <= n / orig && out.size() < target; ++i)
        for (int64_t j = 0; j < nw && out.size() < target; ++j) {
            const double* p = &padded[size_t(i * orig)];
            const double* kj = &kernel[size_t(j * taps)];
            double s = 0.0;
            for (int64_t k = 0; k < taps; ++k) s += p[k] * kj[k];
            out.push_back(static_cast<float>(s));
        }
    return out;
}

// (n_mels, n_fft / 2) triangles on Kaldi's mel scale in float32, as torchaudio's get_mel_banks
std::vector<double> kaldi_bank(size_t n_mels, size_t n_fft, int64_t sr) {
    const double lo = 1127.0 * std::log(1.0 + 20.0 / 700.0), hi = 1127.0 * std::log(1.0 + 0.5 * double(sr) / 700.0);
    const double delta = (hi - lo) / double(n_mels + 1);
    const float flo = float(lo), fdelta = float(delta), fstep = float(double(sr) / double(n_fft));
    const size_t half = n_fft / 2;
    std::vector<float> mel(half);
    for (size_t k = 0; k < half; ++k) mel[k] = 1127.0f * std::log(1.0f + (fstep * float(k)) / 700.0f);
    std::vector<double> bank(n_mels * half);
    for (size_t b = 0; b < n_mels; ++b) {
        const float fb = float(b);
        const float left = flo + fb * fdelta, center = flo + (fb + 1.0f) * fdelta, right = flo + (fb + 2.0f) * fdelta;
        for (size_t k = 0; k < half; ++k) {
            const float up = (mel[k] - left) / (center - left), down = (right - mel[k]) / (right - center);
            bank[b * half + k] = double(std::max(0.0f, std::min(up, down)));
        }
    }
    return bank;
}

// torchaudio.compliance.kaldi.fbank with ImageBind's arguments -> (frames, n_mels) float32
std::vector<float> kaldi_fbank(const float* x, size_t n, const std::vector<double>& bank, size_t n_mels, size_t& frames) {
    const size_t shift = 160, size = 400, n_fft = 512;  // 10 and 25 ms at 16 kHz, the next power of two
    if (n < size) fail(OF_ERR_INPUT, "a clip needs at least one 25 ms frame (400 samples), it has " + std::to_string(n));
    frames = 1 + (n - size) / shift;
    std::vector<double> window(size), frame(size), power(n_fft / 2 + 1);
    for (size_t k = 0; k < size; ++k) window[k] = 0.5 - 0.5 * std::cos(2 * kPi * double(k) / double(size - 1));
    Fft fft(n_fft, false);
    const double eps = double(std::numeric_limits<float>::epsilon());
    std::vector<float> out(frames * n_mels);
    for (size_t f = 0; f < frames; ++f) {
        for (size_t k = 0; k < size; ++k) frame[k] = double(x[f * shift + k]);
        const double mean = pairwise_sum(frame.data(), size) / double(size);
        for (double& v : frame) v -= mean;
        for (size_t k = size - 1; k > 0; --k) frame[k] -= 0.97 * frame[k - 1];  // pre-emphasis, the first against itself
        frame[0] -= 0.97 * frame[0];
        for (size_t k = 0; k < size; ++k) frame[k] *= window[k];
        fft.power(frame.data(), size, power.data());
        for (size_t b = 0; b < n_mels; ++b) {
            double s = 0.0;
            for (size_t k = 0; k < n_fft / 2; ++k) s += power[k] * bank[b * (n_fft / 2) + k];  // the Nyquist bin weighs 0
            out[f * n_mels + b] = static_cast<float>(std::log(std::max(s, eps)));
        }
    }
    return out;
}

// floor(d * i / clips * 16000) for a non-negative double d, exactly (the Fractions of
// video_clip_starts, cut at int(start * 16000))
int64_t clip_begin(double d, int64_t i, int64_t clips) {
    if (d <= 0 || i == 0) return 0;
    int e = 0;
    const double m = std::frexp(d, &e);
    const auto mant = static_cast<unsigned __int128>(std::ldexp(m, 53));  // d = mant * 2^(e - 53)
    e -= 53;
    unsigned __int128 num = mant * static_cast<unsigned __int128>(i * kImageBindRate);
    if (e >= 0) return int64_t((num << e) / static_cast<unsigned __int128>(clips));
    if (-e > 100) return 0;  // below one sample
    return int64_t(num / (static_cast<unsigned __int128>(clips) << -e));
}

std::vector<float> imagebind_clips(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sr, std::vector<int64_t>& shape) {
    if (int64_t(n) * kImageBindRate > kMaxAudioSamples * sr)
        fail(OF_ERR_INPUT, "the audio is longer than " + std::to_string(kMaxAudioSamples) + " samples at 16000 Hz");
    std::vector<float> wave = resample_sinc(std::vector<double>(samples, samples + n), sr, kImageBindRate);
    const double duration = double(wave.size()) / double(kImageBindRate);
    const double max_start = std::max(duration - 2.0, 0.0);
    const size_t n_mels = size_t(fe.n_mels), target = size_t(fe.target_frames);
    std::vector<float> out(size_t(fe.clips) * n_mels * target);
    const std::vector<double> bank = kaldi_bank(n_mels, 512, kImageBindRate);  // the fbank's 512-point FFT
    for (int64_t c = 0; c < fe.clips; ++c) {
        const size_t begin = std::min(size_t(clip_begin(max_start, c, fe.clips)), wave.size());
        const size_t end = std::min(begin + 2 * size_t(kImageBindRate), wave.size());
        float* view = wave.data() + begin;
        const size_t len = end - begin;
        // in place on the shared samples, as ImageBind's waveform -= waveform.mean()
        const float mean = len ? pairwise_sum(view, len) / static_cast<float>(len) : 0.0f;
        for (size_t k = 0; k < len; ++k) view[k] -= mean;
        size_t frames = 0;
        const std::vector<float> fb = kaldi_fbank(view, len, bank, n_mels, frames);
        float* dst = &out[size_t(c) * n_mels * target];
        for (size_t m = 0; m < n_mels; ++m)
            for (size_t t = 0; t < target; ++t)
                dst[m * target + t] = ((t < frames ? fb[t * n_mels + m] : 0.0f) - kImageBindMean) / kImageBindStd;
    }
    shape = {fe.clips, 1, fe.n_mels, fe.target_frames};
    return out;
}

// ---- Whisper: whisper_media.log_mel ----------------------------------------------------------------
std::vector<double> slaney_bank(size_t n_mels) {  // whisper_media.mel_filters: 16 kHz, 400-point, 0-8 kHz
    return triangles(double(kWhisperRate / 2), 201, slaney_edges(0.0, 8000.0, n_mels), n_mels, true);
}

std::vector<float> whisper_features(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sr, std::vector<int64_t>& shape) {
    const std::vector<float> y = resample_spectral(std::vector<double>(samples, samples + n), sr, kWhisperRate);
    const size_t len = size_t(fe.window_s * kWhisperRate), n_fft = 400, hop = 160, n_mels = size_t(fe.n_mels);
    std::vector<double> x(len, 0.0);
    std::copy_n(y.begin(), std::min(len, y.size()), x.begin());
    const std::vector<double> padded = reflect(x, n_fft / 2);
    const size_t frames = 1 + (padded.size() - n_fft) / hop;
    const std::vector<double> mel = mel_power(padded, frames, hop, periodic_hann(n_fft), n_fft, slaney_bank(n_mels), n_mels);
    const size_t kept = frames - 1;  // the last frame dropped
    std::vector<double> spec(n_mels * kept);
    double top = -INFINITY;
    for (size_t m = 0; m < n_mels; ++m)
        for (size_t t = 0; t < kept; ++t) {
            spec[m * kept + t] = std::log10(std::max(mel[t * n_mels + m], 1e-10));
            top = std::max(top, spec[m * kept + t]);
        }
    std::vector<float> out(spec.size());
    for (size_t i = 0; i < spec.size(); ++i) out[i] = static_cast<float>((std::max(spec[i], top - 8.0) + 4.0) / 4.0);
    shape = {1, fe.n_mels, int64_t(kept)};
    return out;
}

// ---- CLAP: clap_media.features ---------------------------------------------------------------------
constexpr int64_t kClapChannels = 4, kClapFusionMels = 64, kClapMaxWindow = 1 << 23, kClapBlock = 2048;
constexpr double kClapLongestS = 300.0;

// clap_media.log_mel_db: (frames, n_mels) 10 log10 of the mel power, floored at 1e-10
std::vector<double> clap_log_mel(const std::vector<double>& x, const AudioFrontEnd& fe, bool slaney, size_t& frames) {
    const size_t n_fft = size_t(fe.n_fft), hop = size_t(fe.hop_length), n_mels = size_t(fe.n_mels);
    const std::vector<double> padded = reflect(x, n_fft / 2);
    frames = 1 + (padded.size() - n_fft) / hop;
    std::vector<double> window(n_fft);  // np.hanning(n_fft + 1)[:-1], as numpy computes it
    const double m1 = double(n_fft);
    for (size_t j = 0; j < n_fft; ++j) window[j] = 0.5 + 0.5 * std::cos(kPi * (1.0 - double(n_fft + 1) + 2.0 * double(j)) / m1);
    const double top = double(fe.sample_rate / 2);
    const std::vector<double> edges = slaney ? slaney_edges(fe.f_min, fe.f_max, n_mels) : htk_edges(fe.f_min, fe.f_max, n_mels);
    const std::vector<double> bank = triangles(top, n_fft / 2 + 1, edges, n_mels, slaney);
    std::vector<double> mel = mel_power(padded, frames, hop, window, n_fft, bank, n_mels);
    for (double& v : mel) v = 10.0 * std::log10(std::max(v, 1e-10));
    return mel;
}

// clap_media.shrink_time: (total, F) float32 rows resized to `frames` rows as torch's bilinear
std::vector<float> shrink_time(const std::vector<float>& mel, size_t total, size_t n_mels, size_t frames) {
    const double scale = double(static_cast<float>(total) / static_cast<float>(frames));
    std::vector<float> out(frames * n_mels);
    for (size_t i = 0; i < frames; ++i) {
        const float src = std::max(0.0f, static_cast<float>(scale * (double(i) + 0.5) - 0.5));
        const size_t i0 = std::min(size_t(std::floor(src)), total - 1), i1 = std::min(i0 + 1, total - 1);
        const float w1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
        for (size_t f = 0; f < n_mels; ++f) out[i * n_mels + f] = (1.0f - w1) * mel[i0 * n_mels + f] + w1 * mel[i1 * n_mels + f];
    }
    return out;
}

std::vector<float> clap_features(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sr, std::vector<int64_t>& shape) {
    const std::vector<float> y = resample_spectral(std::vector<double>(samples, samples + n), sr, fe.sample_rate);
    std::vector<double> x(y.begin(), y.end());
    const size_t window = size_t(double(fe.max_length_s) * double(fe.sample_rate)), n_mels = size_t(fe.n_mels);
    const bool slaney = !fe.fusion;
    const size_t channels = fe.fusion ? size_t(kClapChannels) : 1;
    const size_t chunk = window / size_t(fe.hop_length) + 1;
    if (x.size() > window && slaney) x.resize(window);
    std::vector<float> out;
    size_t frames = 0;
    if (x.size() <= window) {  // _fit: padded to the window
        if (x.size() < window) {
            const std::vector<double> clip = x;
            if (fe.padding == "repeat") {
                x.clear();
                while (x.size() < window) x.insert(x.end(), clip.begin(), clip.end());
                x.resize(window);
            } else {
                if (fe.padding == "repeatpad")
                    for (size_t r = 1; r < window / clip.size(); ++r) x.insert(x.end(), clip.begin(), clip.end());
                x.resize(window, 0.0);
            }
        }
        const std::vector<double> mel = clap_log_mel(x, fe, slaney, frames);
        for (size_t c = 0; c < channels; ++c)
            for (double v : mel) out.push_back(static_cast<float>(v));
    } else {
        const std::vector<double> mel = clap_log_mel(x, fe, false, frames);
        if (frames == chunk) {  // longer by less than a hop: the whole clip fits
            for (size_t c = 0; c < channels; ++c)
                for (double v : mel) out.push_back(static_cast<float>(v));
        } else {
            const std::vector<float> melf(mel.begin(), mel.end());
            out = shrink_time(melf, frames, n_mels, chunk);
            // fusion_starts: the middle of each third of the possible starts (np.array_split)
            const size_t starts = frames - chunk + 1;
            size_t begin = 0;
            for (size_t third = 0; third < 3; ++third) {
                const size_t len = starts / 3 + (third < starts % 3 ? 1 : 0);
                const size_t at = len ? begin + len / 2 : 0;
                out.insert(out.end(), melf.begin() + long(at * n_mels), melf.begin() + long((at + chunk) * n_mels));
                begin += len;
            }
        }
        frames = chunk;
    }
    shape = {1, int64_t(channels), int64_t(frames), int64_t(n_mels)};
    return out;
}

}  // namespace

AudioFrontEnd AudioFrontEnd::from_config(const json& cfg) {
    const std::string what = "audio front end";
    if (!cfg.is_object()) fail(OF_ERR_MANIFEST, "the " + what + " config must be an object, got " + std::string(cfg.type_name()));
    AudioFrontEnd fe;
    const json kind = cfg.value("kind", json());
    if (kind == "imagebind") {  // pipeline._size, then audio_clips' and kaldi_fbank's own bounds
        fe.kind = Kind::ImageBind;
        fe.clips = front_size(cfg, "clips");
        fe.n_mels = front_size(cfg, "n_mels");
        fe.target_frames = front_size(cfg, "target_frames");
        if (fe.clips > kMaxClips)
            fail(OF_ERR_MANIFEST, "the number of clips must be an integer in [1, 64], got " + std::to_string(fe.clips));
        if (fe.n_mels > kMaxMelBins)
            fail(OF_ERR_MANIFEST, "the number of mel bins must be an integer in [1, 1024], got " + std::to_string(fe.n_mels));
        if (fe.n_mels <= 3) fail(OF_ERR_MANIFEST, "Kaldi fbank needs more than 3 mel bins, got " + std::to_string(fe.n_mels));
        return fe;
    }
    if (kind == "whisper") {
        fe.kind = Kind::Whisper;
        fe.window_s = front_size(cfg, "window_s", 30);
        fe.n_mels = front_size(cfg, "n_mels", 256);
        return fe;
    }
    if (kind == "clap") {  // ClapFrontEnd.from_config: its defaults, then problem()
        fe.kind = Kind::Clap;
        auto bad = [](const std::string& why) { fail(OF_ERR_MANIFEST, "the CLAP audio front-end config is invalid: " + why); };
        auto integer = [&](const char* key, int64_t def, int64_t lo, int64_t hi) {
            auto it = cfg.find(key);
            const json v = it == cfg.end() ? json(def) : *it;
            if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi)) || v.get<int64_t>() < lo ||
                v.get<int64_t>() > hi)
                bad(std::string(key) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + py_shown(v));
            return v.get<int64_t>();
        };
        fe.sample_rate = integer("sample_rate", 48000, 1000, 384000);
        fe.n_fft = integer("n_fft", 1024, 2, 1 << 16);
        fe.hop_length = integer("hop_length", 480, 1, 1 << 16);
        fe.n_mels = integer("n_mels", 64, 1, 512);
        std::string shown[3];
        double* values[3] = {&fe.f_min, &fe.f_max, &fe.max_length_s};
        const char* keys[3] = {"f_min", "f_max", "max_length_s"};
        const double defs[3] = {0.0, 14000.0, 10.0};
        for (int i = 0; i < 3; ++i) {
            auto it = cfg.find(keys[i]);
            const json v = it == cfg.end() ? json(defs[i]) : *it;
            if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0)
                bad(std::string(keys[i]) + " must be a finite number >= 0, got " + py_shown(v));
            *values[i] = v.get<double>();
            shown[i] = v.dump();
        }
        const std::string padding = cfg.value("padding", json("repeatpad")).is_string() ? cfg.value("padding", json("repeatpad")).get<std::string>()
                                                                                           : cfg.value("padding", json()).dump();
        const std::string truncation = cfg.value("truncation", json("fusion")).is_string()
                                           ? cfg.value("truncation", json("fusion")).get<std::string>()
                                           : cfg.value("truncation", json()).dump();
        if (fe.n_fft % 2) bad("n_fft must be even, got " + std::to_string(fe.n_fft));
        if (!(fe.f_min < fe.f_max && fe.f_max <= double(fe.sample_rate) / 2))
            bad("the mel range [" + shown[0] + ", " + shown[1] + "] Hz must be increasing and within the Nyquist frequency");
        const int64_t window = int64_t(fe.max_length_s * double(fe.sample_rate));
        if (!(fe.n_fft <= window && window <= kClapMaxWindow))
            bad("the window of " + std::to_string(window) + " samples must lie in [n_fft, " + std::to_string(kClapMaxWindow) + "]");
        if (padding != "repeatpad" && padding != "repeat" && padding != "pad")
            bad("padding '" + padding + "' is not one of repeatpad, repeat, pad");
        if (truncation != "fusion" && truncation != "rand_trunc") bad("truncation '" + truncation + "' is not one of fusion, rand_trunc");
        fe.fusion = truncation == "fusion";
        if (fe.fusion && fe.n_mels != kClapFusionMels)
            bad("the fusion route needs 64 mel bins (the extractor shrinks to 64), got " + std::to_string(fe.n_mels));
        fe.padding = padding;
        return fe;
    }
    fe.n_fft = config_int(cfg, "n_fft", 2, kMaxFft, what, json());
    fe.sample_rate = config_int(cfg, "sample_rate", kMinRate, kMaxRate, what, json());
    fe.hop_length = config_int(cfg, "hop_length", 1, fe.n_fft, what, json());
    fe.n_mels = config_int(cfg, "n_mels", 1, kMaxMelBins, what, json());
    fe.num_frames = config_int(cfg, "num_frames", 1, kMaxMelFrames, what, json());
    fe.mean = config_float(cfg, "mean", what, 0.0);
    fe.std = config_float(cfg, "std", what, 1.0, true);
    const std::pair<const char*, int64_t> products[] = {{"num_frames x n_fft", fe.num_frames * fe.n_fft},
                                                        {"n_mels x (n_fft // 2 + 1)", fe.n_mels * (fe.n_fft / 2 + 1)}};
    for (const auto& [name, size] : products)
        if (size > kMaxMelWork)
            fail(OF_ERR_MANIFEST, "the " + what + " config's " + name + " is " + std::to_string(size) + ", more than " +
                                      std::to_string(kMaxMelWork));
    return fe;
}

namespace {

// The samples the Python runtime reads of a recording for this front end (load_wav's max_seconds,
// and at most MAX_AUDIO_SAMPLES): the seconds its features cover, ImageBind's hour, Whisper's window.
size_t read_length(const AudioFrontEnd& fe, size_t n, int64_t sr) {
    double seconds = kImageBindLongestS;
    if (fe.kind == AudioFrontEnd::Kind::Whisper) seconds = double(fe.window_s);
    if (fe.kind == AudioFrontEnd::Kind::Clap)  // ClapFrontEnd.read_seconds
        seconds = fe.fusion ? kClapLongestS : double(int64_t(fe.max_length_s * double(fe.sample_rate))) / double(fe.sample_rate);
    if (fe.kind == AudioFrontEnd::Kind::LogMel) {
        const int64_t window_samples = (fe.num_frames - 1) * fe.hop_length + fe.n_fft - fe.n_fft / 2;
        seconds = 1.25 * double(window_samples) / double(fe.sample_rate) + 0.01;  // AudioFrontEnd.read_seconds
    }
    return std::min({n, size_t(std::ceil(seconds * double(sr))), size_t(kMaxAudioSamples)});
}

}  // namespace

std::vector<float> audio_items(const AudioFrontEnd& fe, const float* samples, size_t n, int64_t sample_rate,
                               std::vector<int64_t>& shape) {
    if (!samples && n) fail(OF_ERR_INVALID_ARGUMENT, "the samples are a null pointer");
    check_rate(sample_rate, "the audio's sample rate");
    n = read_length(fe, n, sample_rate);
    if (n == 0) fail(OF_ERR_INPUT, "the audio has no samples");
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(samples[i])) fail(OF_ERR_INPUT, "the audio holds NaN or infinite samples");
    switch (fe.kind) {
        case AudioFrontEnd::Kind::ImageBind: return imagebind_clips(fe, samples, n, sample_rate, shape);
        case AudioFrontEnd::Kind::Whisper: return whisper_features(fe, samples, n, sample_rate, shape);
        case AudioFrontEnd::Kind::Clap: return clap_features(fe, samples, n, sample_rate, shape);
        default: return default_features(fe, samples, n, sample_rate, shape);
    }
}

}  // namespace omniforge
