// Next-token selection as omniforge/runtime/sampling.py computes it with numpy: the repetition
// penalty in float32, temperature / top-k / softmax / top-p in float64, and the draw of
// numpy.random.default_rng(seed).choice (SeedSequence -> PCG64, one double per draw, the CDF
// searched from the right), so a seeded request picks the tokens the Python runtime picks.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "internal.hpp"

namespace omniforge {

namespace {

// numpy's SeedSequence (bit_generator.pyx): the seed's 32-bit words mixed into a pool of four.
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr uint32_t kMixL = 0xca01f9dd, kMixR = 0x4973f715;
constexpr int kXShift = 16;

void seed_sequence_state(uint64_t seed, uint64_t out[4]) {
    std::vector<uint32_t> entropy;
    if (seed == 0) entropy.push_back(0);
    for (uint64_t s = seed; s; s >>= 32) entropy.push_back(static_cast<uint32_t>(s));
    uint32_t hash_const = kInitA;
    auto hashmix = [&hash_const](uint32_t v) {
        v ^= hash_const;
        hash_const *= kMultA;
        v *= hash_const;
        v ^= v >> kXShift;
        return v;
    };
    auto mix = [](uint32_t x, uint32_t y) {
        uint32_t r = kMixL * x - kMixR * y;
        r ^= r >> kXShift;
        return r;
    };
    uint32_t pool[4];
    for (size_t i = 0; i < 4; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0);
    for (size_t s = 0; s < 4; ++s)
        for (size_t d = 0; d < 4; ++d)
            if (s != d) pool[d] = mix(pool[d], hashmix(pool[s]));
    for (size_t s = 4; s < entropy.size(); ++s)
        for (size_t d = 0; d < 4; ++d) pool[d] = mix(pool[d], hashmix(entropy[s]));
    // generate_state(4, uint64): eight 32-bit words, paired little-endian
    uint32_t words[8];
    hash_const = kInitB;
    for (size_t i = 0; i < 8; ++i) {
        uint32_t v = pool[i % 4];
        v ^= hash_const;
        hash_const *= kMultB;
        v *= hash_const;
        v ^= v >> kXShift;
        words[i] = v;
    }
    for (size_t i = 0; i < 4; ++i) out[i] = uint64_t(words[2 * i]) | (uint64_t(words[2 * i + 1]) << 32);
}

using u128 = unsigned __int128;
constexpr u128 kPcgMult = (u128(0x2360ED051FC65DA4ull) << 64) | 0x4385DF649FCCF645ull;

}  // namespace

Rng::Rng(uint64_t seed) {
    uint64_t v[4];
    seed_sequence_state(seed, v);
    const u128 initstate = (u128(v[0]) << 64) | v[1];
    const u128 initseq = (u128(v[2]) << 64) | v[3];
    inc_ = (initseq << 1) | 1;
    state_ = 0;
    state_ = state_ * kPcgMult + inc_;
    state_ += initstate;
    state_ = state_ * kPcgMult + inc_;
}

uint64_t Rng::next64() {  // PCG64 XSL-RR: step, then output the new state
    state_ = state_ * kPcgMult + inc_;
    const uint64_t x = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    const unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
}

double Rng::next_double() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

namespace {

// The 256 layers of the normal ziggurat numpy's standard_normal draws from (right edge
// 3.6541528853610088), computed here in long double: layer i's right edge x_i (x_255 at the edge,
// each layer of equal area v above the next), 2^52-scaled widths, acceptance thresholds, densities.
// numpy carries its tables as constants; with these, 1.6 million draws (8 seeds) came within 4e-15
// of numpy's, all equal once rounded to float32.
struct Ziggurat {
    double wi[256], fi[256];
    uint64_t ki[256];
    double r = 3.6541528853610088, inv_r = 1.0 / 3.6541528853610088;
    Ziggurat() {
        const long double R = r, two52 = 4503599627370496.0L;
        auto f = [](long double x) { return std::exp(-0.5L * x * x); };
        const long double v = R * f(R) + std::sqrt(3.14159265358979323846264338327950288L / 2) * std::erfc(R / std::sqrt(2.0L));
        long double x[256];
        x[0] = 0;
        x[255] = R;
        for (int i = 255; i > 1; --i) x[i - 1] = std::sqrt(-2.0L * std::log(f(x[i]) + v / x[i]));
        const long double base = v / f(R);  // the bottom layer's width, its tail included
        wi[0] = double(base / two52);
        ki[0] = uint64_t(two52 * R / base);
        fi[0] = 1.0;
        for (int i = 1; i < 256; ++i) {
            wi[i] = double(x[i] / two52);
            ki[i] = uint64_t(two52 * x[i - 1] / x[i]);
            fi[i] = double(f(x[i]));
        }
    }
};

}  // namespace

double Rng::standard_normal() {  // numpy's random_standard_normal
    static const Ziggurat z;
    for (;;) {
        uint64_t r = next64();
        const int idx = int(r & 0xff);
        r >>= 8;
        const bool negative = r & 0x1;
        const uint64_t rabs = (r >> 1) & 0x000fffffffffffffULL;
        double x = double(rabs) * z.wi[idx];
        if (negative) x = -x;
        if (rabs < z.ki[idx]) return x;  // 99.3% of draws
        if (idx == 0) {                  // the tail beyond the edge
            for (;;) {
                const double xx = -z.inv_r * std::log1p(-next_double());
                const double yy = -std::log1p(-next_double());
                if (yy + yy > xx * xx) return ((rabs >> 8) & 0x1) ? -(z.r + xx) : z.r + xx;
            }
        }
        if ((z.fi[idx - 1] - z.fi[idx]) * next_double() + z.fi[idx] < std::exp(-0.5 * x * x)) return x;
    }
}

namespace {

std::string number(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}

}  // namespace

void check_sampling(const SamplingConfig& c) {
    if (!std::isfinite(c.temperature)) fail(OF_ERR_INVALID_ARGUMENT, "temperature must be finite, got " + number(c.temperature));
    if (c.temperature < 0) fail(OF_ERR_INVALID_ARGUMENT, "temperature must be >= 0, got " + number(c.temperature));
    if ((c.temperature > 0 && c.temperature < kMinTemperature) || c.temperature > kMaxTemperature)
        fail(OF_ERR_INVALID_ARGUMENT, "temperature must be 0 (greedy) or lie in [" + number(kMinTemperature) + ", " +
                                          number(kMaxTemperature) + "], got " + number(c.temperature));
    if (c.top_k < 0) fail(OF_ERR_INVALID_ARGUMENT, "top_k must be >= 0, got " + std::to_string(c.top_k));
    if (!std::isfinite(c.top_p)) fail(OF_ERR_INVALID_ARGUMENT, "top_p must be finite, got " + number(c.top_p));
    if (!(c.top_p > 0 && c.top_p <= 1)) fail(OF_ERR_INVALID_ARGUMENT, "top_p must lie in (0, 1], got " + number(c.top_p));
    if (!std::isfinite(c.repetition_penalty))
        fail(OF_ERR_INVALID_ARGUMENT, "repetition_penalty must be finite, got " + number(c.repetition_penalty));
    if (c.repetition_penalty <= 0)
        fail(OF_ERR_INVALID_ARGUMENT, "repetition_penalty must be > 0, got " + number(c.repetition_penalty));
    if (c.repetition_penalty < kMinPenalty || c.repetition_penalty > kMaxPenalty)
        fail(OF_ERR_INVALID_ARGUMENT, "repetition_penalty must lie in [" + number(kMinPenalty) + ", " + number(kMaxPenalty) +
                                          "], got " + number(c.repetition_penalty));
}

int32_t Sampler::select(const float* logits, size_t n, const SamplingConfig& c, Rng& rng, const std::vector<int32_t>& history) {
    if (n == 0) fail(OF_ERR_INTERNAL, "no logits to choose from");
    const float* l = logits;
    if (c.repetition_penalty != 1.0 && !history.empty()) {  // apply_repetition_penalty, in float32
        penalized.assign(logits, logits + n);
        seen.assign(n, 0);
        const float p = static_cast<float>(c.repetition_penalty);
        for (int32_t id : history) {
            if (id < 0 || size_t(id) >= n || seen[size_t(id)]) continue;
            seen[size_t(id)] = 1;
            float& v = penalized[size_t(id)];
            v = v < 0 ? v * p : v / p;
        }
        l = penalized.data();
    }
    if (c.temperature == 0.0) {  // numpy's argmax: the first maximum; a NaN counts as the maximum
        size_t best = 0;
        for (size_t i = 0; i < n; ++i) {
            if (std::isnan(l[i])) return static_cast<int32_t>(i);
            if (l[i] > l[best]) best = i;
        }
        return static_cast<int32_t>(best);
    }
    z.resize(n);
    for (size_t i = 0; i < n; ++i) {
        if (std::isnan(l[i])) fail(OF_ERR_ENGINE, "the LLM produced NaN logits; a token cannot be sampled");
        z[i] = static_cast<double>(l[i]) / c.temperature;
    }
    if (c.top_k > 0 && size_t(c.top_k) < n) {
        probs.assign(z.begin(), z.end());
        std::nth_element(probs.begin(), probs.begin() + (c.top_k - 1), probs.end(), std::greater<double>());
        const double kth = probs[size_t(c.top_k - 1)];
        for (double& v : z)
            if (v < kth) v = -INFINITY;
    }
    const double m = *std::max_element(z.begin(), z.end());
    probs.resize(n);
    for (size_t i = 0; i < n; ++i) probs[i] = std::exp(z[i] - m);
    double s = pairwise_sum(probs.data(), n);
    for (double& v : probs) v /= s;
    if (c.top_p < 1.0) {
        order.resize(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return -probs[size_t(a)] < -probs[size_t(b)]; });
        seen.assign(n, 0);
        double cum = 0.0;
        for (size_t j = 0; j < n; ++j) {
            const double p = probs[size_t(order[j])];
            cum += p;
            if (cum - p < c.top_p) seen[size_t(order[j])] = 1;
        }
        for (size_t i = 0; i < n; ++i)
            if (!seen[i]) probs[i] = 0.0;
        s = pairwise_sum(probs.data(), n);
        for (double& v : probs) v /= s;
    }
    // Generator.choice(n, p=probs): cdf = cumsum(p) / cdf[-1]; searchsorted(cdf, random(), 'right')
    cdf.resize(n);
    double acc = 0.0;
    for (size_t i = 0; i < n; ++i) cdf[i] = acc += probs[i];
    const double last = cdf[n - 1];
    for (double& v : cdf) v /= last;
    const double u = rng.next_double();
    size_t idx = static_cast<size_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    return static_cast<int32_t>(std::min(idx, n - 1));
}

}  // namespace omniforge
