// The image front ends (image_frontend.hpp): CLIP's preprocessing (media.preprocess_image), BLIP's
// exact-size resize (image_frontends.resize_normalize) and ImageBind's image and video transforms
// (imagebind_media.image_clip / clips_from_frames), in the Python runtime's arithmetic.
//
// Pillow's resampling is written here rather than taken from a library: the encoders were exported
// against Pillow's exact output, and no C/C++ image library reproduces its fixed-point filters.
// This file is compiled with -ffp-contract=off so that float expressions round as numpy's do.
#include "image_frontend.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "config_values.hpp"
#include "internal.hpp"
#include "schedulers.hpp"

namespace omniforge {

using json = nlohmann::json;

namespace {

constexpr int64_t kMaxPixels = 64000000;  // media.MAX_PIXELS
constexpr int64_t kMaxAspect = 100;       // media.MAX_ASPECT
constexpr int64_t kMaxSide = 4096;        // media.MAX_PREPROCESS_SIDE, imagebind_media.MAX_IMAGE_SIDE
constexpr int64_t kMaxClips = 64;         // imagebind_media.MAX_CLIPS
constexpr double kPi = 3.14159265358979323846;
constexpr int64_t kMaxFilter = 7;  // Pillow 13's filters: max(Image.Resampling)
constexpr float kClipMean[3] = {0.48145466f, 0.4578275f, 0.40821073f};  // imagebind_media.CLIP_MEAN
constexpr float kClipStd[3] = {0.26862954f, 0.26130258f, 0.27577711f};

std::string dims(int64_t w, int64_t h) { return std::to_string(w) + "x" + std::to_string(h); }

// media.check_image_size, and the buffer a caller handed over
void check_image(const RgbView& im, const std::string& name) {
    if (im.width < 1 || im.height < 1) fail(OF_ERR_INPUT, "image '" + name + "' is " + dims(im.width, im.height) + ": it has no pixels");
    if (im.width > kMaxPixels / im.height)
        fail(OF_ERR_INPUT, "image '" + name + "' has " + dims(im.width, im.height) + " pixels, more than " + std::to_string(kMaxPixels));
    if (std::max(im.width, im.height) > kMaxAspect * std::min(im.width, im.height))
        fail(OF_ERR_INPUT, "image '" + name + "' is " + dims(im.width, im.height) + ", an aspect ratio beyond " +
                               std::to_string(kMaxAspect) + ":1");
    if (!im.pixels) fail(OF_ERR_INVALID_ARGUMENT, "the " + name + "'s pixels are a null pointer");
    if (im.stride < size_t(im.width) * 3)
        fail(OF_ERR_INVALID_ARGUMENT, "the " + name + "'s row stride " + std::to_string(im.stride) + " is below its " +
                                          std::to_string(im.width) + " pixels x 3 bytes");
}

// media._channel_stats: one or three finite numbers (std: each of magnitude >= 1e-6), as float32
void channel_stats(const json& cfg, const std::string& key, bool nonzero, float out[3]) {
    const std::string what = "image preprocessor";
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json{0.5, 0.5, 0.5} : *it;
    double vals[3] = {0, 0, 0};
    bool ok = false;
    auto good = [&](const json& x, double* d) {
        if (!x.is_number()) return false;
        *d = x.get<double>();
        return std::isfinite(*d) && std::fabs(*d) <= 1e6 && (!nonzero || std::fabs(*d) >= 1e-6);
    };
    if (v.is_number()) {
        ok = good(v, &vals[0]);
        vals[1] = vals[2] = vals[0];
    } else if (v.is_array() && v.size() == 3) {
        ok = good(v[0], &vals[0]) && good(v[1], &vals[1]) && good(v[2], &vals[2]);
    }
    if (!ok)
        fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be " +
                                  (nonzero ? "one or three finite, non-zero numbers of magnitude in [1e-06, 1e+06]"
                                           : "one or three finite numbers in [-1e+06, 1e+06]") +
                                  ", got " + py_shown(v));
    for (int c = 0; c < 3; ++c) out[c] = static_cast<float>(vals[c]);
}

// image_frontends._int / _triple (BLIP's processor)
int64_t resize_int(const json& cfg, const std::string& key, int64_t lo, int64_t hi) {
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json() : *it;
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi)) || v.get<int64_t>() < lo ||
        v.get<int64_t>() > hi)
        fail(OF_ERR_MANIFEST, "the image front end's '" + key + "' must be an integer in [" + std::to_string(lo) + ", " +
                                  std::to_string(hi) + "], got " + py_shown(v));
    return v.get<int64_t>();
}

void resize_triple(const json& cfg, const std::string& key, float out[3]) {
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json() : *it;
    bool ok = v.is_array() && v.size() == 3;
    for (size_t c = 0; ok && c < 3; ++c) {
        ok = v[c].is_number() && std::isfinite(v[c].get<double>()) && (key != "std" || v[c].get<double>() > 0);
        if (ok) out[c] = static_cast<float>(v[c].get<double>());
    }
    if (!ok) fail(OF_ERR_MANIFEST, "the image front end's '" + key + "' must be three finite numbers, got " + py_shown(v));
}

// ---- Pillow's resampling (libImaging/Resample.c, Geometry.c) ----------------------------------------
struct Filter {
    double (*fn)(double);
    double support;
};

double box_filter(double x) { return x > -0.5 && x <= 0.5 ? 1.0 : 0.0; }
double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}
double hamming_filter(double x) {
    if (x < 0.0) x = -x;
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x = x * kPi;
    return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));  // float constants, as Pillow writes them
}
double bicubic_filter(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}
double sinc_filter(double x) {
    if (x == 0.0) return 1.0;
    x = x * kPi;
    return std::sin(x) / x;
}
double lanczos_filter(double x) { return -3.0 <= x && x < 3.0 ? sinc_filter(x) * sinc_filter(x / 3) : 0.0; }
double mks2013_filter(double x) {  // Magic Kernel Sharp 2013
    if (x < 0) x = -x;
    if (x < 0.5) return 17.0 / 16.0 - 7.0 / 4.0 * std::pow(x, 2);
    if (x < 1.5) return (1.0 - x) * (7.0 / 4.0 - x);
    if (x < 2.5) return -1.0 / 8.0 * std::pow(x - 5.0 / 2.0, 2);
    return 0;
}
double mks2021_filter(double x) {  // Magic Kernel Sharp 2021
    if (x < 0) x = -x;
    if (x < 0.5) return 577.0 / 576.0 - 239.0 / 144.0 * std::pow(x, 2);
    if (x < 1.5) return 35.0 / 36.0 * (x - 1.0) * (x - 239.0 / 140.0);
    if (x < 2.5) return 1.0 / 6.0 * (x - 2.0) * (65.0 / 24.0 - x);
    if (x < 3.5) return 1.0 / 36.0 * (x - 3.0) * (x - 15.0 / 4.0);
    if (x < 4.5) return -1.0 / 288.0 * std::pow(x - 9.0 / 2.0, 2);
    return 0;
}

Filter filter_of(int id) {
    switch (id) {
        case 1: return {lanczos_filter, 3.0};
        case 2: return {bilinear_filter, 1.0};
        case 3: return {bicubic_filter, 2.0};
        case 4: return {box_filter, 0.5};
        case 5: return {hamming_filter, 1.0};
        case 6: return {mks2013_filter, 2.5};
        case 7: return {mks2021_filter, 4.5};
        default: fail(OF_ERR_MANIFEST, "Pillow filter " + std::to_string(id) + " is not one the image front ends use");
    }
}

constexpr int kPrecisionBits = 32 - 8 - 2;

// precompute_coeffs + normalize_coeffs_8bpc: per output pixel, its first input pixel, how many it
// reads, and their fixed-point weights
struct Coeffs {
    int ksize = 0;
    std::vector<int> bounds;  // (xmin, count) per output pixel
    std::vector<int32_t> kk;
};

Coeffs precompute(int in_size, float in0, float in1, int out_size, const Filter& f) {
    double filterscale, scale;
    filterscale = scale = static_cast<double>(in1 - in0) / out_size;
    if (filterscale < 1.0) filterscale = 1.0;
    const double support = f.support * filterscale;
    Coeffs c;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.bounds.resize(size_t(out_size) * 2);
    c.kk.assign(size_t(out_size) * size_t(c.ksize), 0);
    std::vector<double> k(size_t(c.ksize));
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; ++x) {
            const double w = f.fn((x + xmin - center + 0.5) * ss);
            k[size_t(x)] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; ++x)
            if (ww != 0.0) k[size_t(x)] /= ww;
        int32_t* out = &c.kk[size_t(xx) * size_t(c.ksize)];
        for (int x = 0; x < xmax; ++x) {
            const double v = k[size_t(x)];
            out[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits)) : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
        }
        c.bounds[size_t(xx) * 2] = xmin;
        c.bounds[size_t(xx) * 2 + 1] = xmax;
    }
    return c;
}

inline uint8_t clip8(int64_t in) {
    const int64_t v = in >> kPrecisionBits;  // Pillow's lookup table: the shifted sum clamped to a byte
    return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

// An RGB byte image one pass reads or writes.
struct Plane {
    const uint8_t* data;
    size_t stride;
    int64_t w, h;
};

// ImagingResampleHorizontal_8bpc: rows [offset, offset + rows) of `in` to out_w columns.
Plane horizontal_pass(const Plane& in, int offset, int rows, const Coeffs& c, int out_w, std::vector<uint8_t>& store) {
    store.resize(size_t(rows) * size_t(out_w) * 3);
    for (int yy = 0; yy < rows; ++yy) {
        const uint8_t* row = in.data + size_t(yy + offset) * in.stride;
        for (int xx = 0; xx < out_w; ++xx) {
            const int xmin = c.bounds[size_t(xx) * 2], xmax = c.bounds[size_t(xx) * 2 + 1];
            const int32_t* k = &c.kk[size_t(xx) * size_t(c.ksize)];
            int64_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < xmax; ++x) {
                const uint8_t* p = row + size_t(x + xmin) * 3;
                s0 += int64_t(p[0]) * k[x];
                s1 += int64_t(p[1]) * k[x];
                s2 += int64_t(p[2]) * k[x];
            }
            uint8_t* o = &store[(size_t(yy) * size_t(out_w) + size_t(xx)) * 3];
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
    return Plane{store.data(), size_t(out_w) * 3, out_w, rows};
}

// ImagingResampleVertical_8bpc: `in` to out_h rows.
Plane vertical_pass(const Plane& in, const Coeffs& c, int out_h, std::vector<uint8_t>& store) {
    store.resize(size_t(in.w) * size_t(out_h) * 3);
    for (int yy = 0; yy < out_h; ++yy) {
        const int32_t* k = &c.kk[size_t(yy) * size_t(c.ksize)];
        const int ymin = c.bounds[size_t(yy) * 2], ymax = c.bounds[size_t(yy) * 2 + 1];
        for (int64_t xx = 0; xx < in.w; ++xx) {
            int64_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
            for (int y = 0; y < ymax; ++y) {
                const uint8_t* p = in.data + size_t(y + ymin) * in.stride + size_t(xx) * 3;
                s0 += int64_t(p[0]) * k[y];
                s1 += int64_t(p[1]) * k[y];
                s2 += int64_t(p[2]) * k[y];
            }
            uint8_t* o = &store[(size_t(yy) * size_t(in.w) + size_t(xx)) * 3];
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
    return Plane{store.data(), size_t(in.w) * 3, in.w, out_h};
}

// Pillow's ImagingScaleAffine for NEAREST: source pixels picked by accumulated float steps.
std::vector<uint8_t> nearest_resize(const RgbView& im, int64_t out_w, int64_t out_h) {
    const double a0 = static_cast<double>(static_cast<float>(im.width)) / out_w;
    const double a4 = static_cast<double>(static_cast<float>(im.height)) / out_h;
    auto coord = [](double v) { return v < 0.0 ? -1 : static_cast<int>(v); };
    std::vector<int> xintab(size_t(out_w), 0);
    int64_t xmin = out_w, xmax = 0;
    double xo = 0.0 + a0 * 0.5, yo = 0.0 + a4 * 0.5;
    for (int64_t x = 0; x < out_w; ++x) {
        const int xin = coord(xo);
        if (xin >= 0 && xin < im.width) {
            xmax = x + 1;
            if (x < xmin) xmin = x;
            xintab[size_t(x)] = xin;
        }
        xo += a0;
    }
    std::vector<uint8_t> out(size_t(out_w * out_h) * 3, 0);
    for (int64_t y = 0; y < out_h; ++y) {
        const int yi = coord(yo);
        if (yi >= 0 && yi < im.height) {
            const uint8_t* row = im.pixels + size_t(yi) * im.stride;
            for (int64_t x = xmin; x < xmax; ++x)
                std::copy_n(row + size_t(xintab[size_t(x)]) * 3, 3, &out[size_t(y * out_w + x) * 3]);
        }
        yo += a4;
    }
    return out;
}

// ---- the front ends' float arithmetic ------------------------------------------------------------------
struct Pixels {  // an (h, w, 3) byte image
    std::vector<uint8_t> data;
    int64_t w = 0, h = 0;
};

Pixels copy_of(const RgbView& im) {
    Pixels p;
    p.w = im.width;
    p.h = im.height;
    p.data.resize(size_t(p.w * p.h) * 3);
    for (int64_t y = 0; y < p.h; ++y) std::copy_n(im.pixels + size_t(y) * im.stride, size_t(p.w) * 3, &p.data[size_t(y * p.w) * 3]);
    return p;
}

Pixels resized(const RgbView& im, int64_t w, int64_t h, int filter) {
    Pixels p;
    p.w = w;
    p.h = h;
    p.data = pillow_resize(im, w, h, filter);
    return p;
}

// The resized size of torchvision's / CLIP's Resize(int): the short side to `side`, the long side
// truncated (Python's int(side * long / short) on exact integers)
std::pair<int64_t, int64_t> short_side(int64_t w, int64_t h, int64_t side) {
    if (w <= h) return {side, static_cast<int64_t>(static_cast<double>(side * h) / static_cast<double>(w))};
    return {static_cast<int64_t>(static_cast<double>(side * w) / static_cast<double>(h)), side};
}

void check_resized(int64_t w, int64_t h, int64_t nw, int64_t nh) {
    if (nw > kMaxPixels / nh)
        fail(OF_ERR_INPUT, "a " + dims(w, h) + " image resized to " + dims(nw, nh) + " would have more than " + std::to_string(kMaxPixels) +
                               " pixels");
}

// (h, w, 3) bytes at rows [top, top+ch) and columns [left, left+cw) -> (3, ch, cw) floats through `value`
template <class F>
std::vector<float> planar(const Pixels& p, int64_t top, int64_t left, int64_t ch, int64_t cw, F value) {
    std::vector<float> out(size_t(3 * ch * cw));
    for (int c = 0; c < 3; ++c)
        for (int64_t y = 0; y < ch; ++y)
            for (int64_t x = 0; x < cw; ++x)
                out[size_t((c * ch + y) * cw + x)] = value(p.data[size_t(((top + y) * p.w + (left + x)) * 3 + c)], c);
    return out;
}

// media.preprocess_image
std::vector<float> clip_item(const ImageFrontEnd& fe, const RgbView& im, std::vector<int64_t>& shape) {
    const int64_t w = im.width, h = im.height;
    int64_t nw = w, nh = h;
    if (fe.do_resize) {
        std::tie(nw, nh) = short_side(w, h, fe.shortest_edge);
        check_resized(w, h, nw, nh);
    }
    if (!fe.do_center_crop && std::max(nw, nh) > kMaxSide)
        fail(OF_ERR_INPUT, "a " + dims(w, h) + " image preprocessed without a center crop is " + dims(nw, nh) + "; at most " +
                               std::to_string(kMaxSide) + " pixels a side are encoded");
    Pixels p = nw != w || nh != h ? resized(im, nw, nh, fe.resample) : copy_of(im);
    int64_t top = 0, left = 0, ch = p.h, cw = p.w;
    if (fe.do_center_crop) {
        ch = fe.crop_h;
        cw = fe.crop_w;
        if (p.h < ch || p.w < cw) {  // padded with zeros first, like transformers' center_crop
            Pixels padded;
            padded.w = std::max(cw, p.w);
            padded.h = std::max(ch, p.h);
            padded.data.assign(size_t(padded.w * padded.h) * 3, 0);
            const int64_t pt = (padded.h - p.h) / 2, pl = (padded.w - p.w) / 2;
            for (int64_t y = 0; y < p.h; ++y)
                std::copy_n(&p.data[size_t(y * p.w) * 3], size_t(p.w) * 3, &padded.data[size_t((pt + y) * padded.w + pl) * 3]);
            p = std::move(padded);
        }
        top = (p.h - ch) / 2;
        left = (p.w - cw) / 2;
    }
    shape = {3, ch, cw};
    return planar(p, top, left, ch, cw, [&](uint8_t v, int c) {
        float x = static_cast<float>(static_cast<double>(v) * fe.rescale);  // float64 rescale, then float32
        return fe.do_normalize ? (x - fe.mean[c]) / fe.std[c] : x;
    });
}

// image_frontends.resize_normalize (BLIP)
std::vector<float> resize_item(const ImageFrontEnd& fe, const RgbView& im, std::vector<int64_t>& shape) {
    check_resized(im.width, im.height, fe.width, fe.height);
    Pixels p = resized(im, fe.width, fe.height, fe.resample);
    shape = {3, fe.height, fe.width};
    return planar(p, 0, 0, p.h, p.w, [&](uint8_t v, int c) { return (static_cast<float>(v) / 255.0f - fe.mean[c]) / fe.std[c]; });
}

// imagebind_media.image_clip: a 2-frame clip of the image
std::vector<float> imagebind_item(const ImageFrontEnd& fe, const RgbView& im, std::vector<int64_t>& shape) {
    constexpr int64_t frames = 2;
    const int64_t w = im.width, h = im.height, size = fe.size;
    auto [nw, nh] = short_side(w, h, size);
    check_resized(w, h, nw, nh);
    Pixels p = nw != w || nh != h ? resized(im, nw, nh, 3) : copy_of(im);
    // torchvision's center_crop offsets: Python's round, halves to even
    const int64_t top = static_cast<int64_t>(std::nearbyint((nh - size) / 2.0));
    const int64_t left = static_cast<int64_t>(std::nearbyint((nw - size) / 2.0));
    std::vector<float> plane = planar(p, top, left, size, size, [](uint8_t v, int c) {
        return (static_cast<float>(v) / 255.0f - kClipMean[c]) / kClipStd[c];
    });
    const size_t area = size_t(size * size);
    std::vector<float> out(size_t(3 * frames) * area);
    for (size_t c = 0; c < 3; ++c)
        for (size_t f = 0; f < size_t(frames); ++f) std::copy_n(&plane[c * area], area, &out[(c * size_t(frames) + f) * area]);
    shape = {3, frames, size, size};
    return out;
}

// imagebind_media._linear_taps: torch's bilinear source taps (align_corners=False, no antialias), float32
struct Taps {
    std::vector<int64_t> i0, i1;
    std::vector<float> lam;
};

Taps linear_taps(int64_t n_in, int64_t n_out) {
    Taps t;
    const float scale = static_cast<float>(static_cast<double>(n_in) / static_cast<double>(n_out));
    for (int64_t i = 0; i < n_out; ++i) {
        float src = (static_cast<float>(i) + 0.5f) * scale - 0.5f;
        if (src < 0) src = 0;
        const int64_t i0 = static_cast<int64_t>(src);
        float lam = src - static_cast<float>(i0);
        lam = std::min(std::max(lam, 0.0f), 1.0f);
        t.i0.push_back(i0);
        t.i1.push_back(std::min(i0 + 1, n_in - 1));
        t.lam.push_back(lam);
    }
    return t;
}

// imagebind_media.clips_from_frames for one clip: (3, T, size, size) x 3 crops, appended to `out`
void imagebind_clip(const RgbView* frames, int64_t t, int64_t size, std::vector<float>& out) {
    const int64_t h = frames[0].height, w = frames[0].width;
    int64_t nh, nw;  // pytorchvideo's ShortSideScale: floor(long / short * size)
    if (w < h) {
        nh = static_cast<int64_t>(std::floor(static_cast<double>(h) / static_cast<double>(w) * static_cast<double>(size)));
        nw = size;
    } else {
        nh = size;
        nw = static_cast<int64_t>(std::floor(static_cast<double>(w) / static_cast<double>(h) * static_cast<double>(size)));
    }
    if (nw > kMaxPixels / nh)
        fail(OF_ERR_INPUT, "a " + dims(w, h) + " video resized to " + dims(nw, nh) + " would have more than " + std::to_string(kMaxPixels) + " pixels");
    const Taps th = linear_taps(h, nh), tw = linear_taps(w, nw);
    // per frame and channel: rows first (x[h0] * (1 - lh) + x[h1] * lh), then columns, as numpy does
    std::vector<float> scaled(size_t(3 * t) * size_t(nh * nw));  // (3, T, nh, nw)
    std::vector<float> rows(size_t(nh * w));
    for (int64_t f = 0; f < t; ++f) {
        const RgbView& im = frames[f];
        for (int c = 0; c < 3; ++c) {
            auto px = [&](int64_t y, int64_t x) { return static_cast<float>(im.pixels[size_t(y) * im.stride + size_t(x) * 3 + size_t(c)]) / 255.0f; };
            for (int64_t y = 0; y < nh; ++y) {
                const float l = th.lam[size_t(y)], one_minus = 1.0f - l;
                for (int64_t x = 0; x < w; ++x) {
                    const float a = px(th.i0[size_t(y)], x) * one_minus;
                    const float b = px(th.i1[size_t(y)], x) * l;
                    rows[size_t(y * w + x)] = a + b;
                }
            }
            float* dst = &scaled[size_t((c * t + f) * nh * nw)];
            for (int64_t y = 0; y < nh; ++y)
                for (int64_t x = 0; x < nw; ++x) {
                    const float l = tw.lam[size_t(x)], one_minus = 1.0f - l;
                    const float a = rows[size_t(y * w + tw.i0[size_t(x)])] * one_minus;
                    const float b = rows[size_t(y * w + tw.i1[size_t(x)])] * l;
                    dst[y * nw + x] = (a + b - kClipMean[c]) / kClipStd[c];
                }
        }
    }
    // ImageBind's SpatialCrop(size, 3): start, centre and end of the long side
    const int64_t cy = (nh - size + 1) / 2, cx = (nw - size + 1) / 2;  // ceil((n - size) / 2), n >= size
    for (int idx = 0; idx < 3; ++idx) {
        int64_t top = cy, left = cx;
        if (nh > nw)
            top = idx == 0 ? 0 : idx == 1 ? cy : nh - size;
        else
            left = idx == 0 ? 0 : idx == 1 ? cx : nw - size;
        for (int64_t ct = 0; ct < 3 * t; ++ct)
            for (int64_t y = 0; y < size; ++y) {
                const float* src = &scaled[size_t((ct * nh + top + y) * nw + left)];
                out.insert(out.end(), src, src + size);
            }
    }
}

}  // namespace

ImageFrontEnd ImageFrontEnd::from_config(const json& cfg) {
    const std::string what = "image preprocessor";
    if (!cfg.is_object()) fail(OF_ERR_MANIFEST, "the " + what + " config must be an object, got " + std::string(cfg.type_name()));
    ImageFrontEnd fe;
    const json kind = cfg.value("kind", json());
    if (kind == "imagebind") {
        fe.kind = Kind::ImageBind;
        fe.size = front_size(cfg, "size");
        fe.frames_per_clip = cfg.contains("frames_per_clip") ? front_size(cfg, "frames_per_clip") : 0;  // checked when a video uses it
        fe.video_clips = cfg.contains("video_clips") ? front_size(cfg, "video_clips") : 0;
        return fe;
    }
    if (kind == "resize") {
        fe.kind = Kind::Resize;
        fe.height = resize_int(cfg, "height", 1, kMaxSide);
        fe.width = resize_int(cfg, "width", 1, kMaxSide);
        fe.resample = static_cast<int>(resize_int(cfg, "resample", 0, 5));
        resize_triple(cfg, "mean", fe.mean);
        resize_triple(cfg, "std", fe.std);
        return fe;
    }
    const json size = config_section(cfg, "size", what);
    fe.shortest_edge = config_int(size, "shortest_edge", 1, kMaxSide, what, json(224));
    json crop = config_section(cfg, "crop_size", what);
    if (crop.empty()) crop = json{{"height", fe.shortest_edge}, {"width", fe.shortest_edge}};
    fe.crop_h = config_int(crop, "height", 1, kMaxSide, what, json(fe.shortest_edge));
    fe.crop_w = config_int(crop, "width", 1, kMaxSide, what, json(fe.shortest_edge));
    fe.resample = static_cast<int>(config_int(cfg, "resample", 0, kMaxFilter, what, json(3)));
    const bool do_rescale = config_bool(cfg, "do_rescale", what, true);
    fe.rescale = do_rescale ? config_float(cfg, "rescale_factor", what, 1.0 / 255.0) : 1.0;
    fe.do_resize = config_bool(cfg, "do_resize", what, true);
    fe.do_center_crop = config_bool(cfg, "do_center_crop", what, true);
    fe.do_normalize = config_bool(cfg, "do_normalize", what, true);
    channel_stats(cfg, "image_mean", false, fe.mean);
    channel_stats(cfg, "image_std", true, fe.std);
    return fe;
}

std::vector<uint8_t> pillow_resize(const RgbView& im, int64_t out_w, int64_t out_h, int filter) {
    if (out_w < 1 || out_h < 1 || out_w > kMaxPixels / out_h) fail(OF_ERR_INPUT, "cannot resize an image to " + dims(out_w, out_h));
    if (filter == 0) return nearest_resize(im, out_w, out_h);
    const Filter f = filter_of(filter);
    const int in_w = static_cast<int>(im.width), in_h = static_cast<int>(im.height);
    const bool need_h = out_w != in_w, need_v = out_h != in_h;
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width
    const bool horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2);
    Coeffs cv = precompute(in_h, 0.0f, static_cast<float>(in_h), static_cast<int>(out_h), f);
    const Coeffs ch = precompute(in_w, 0.0f, static_cast<float>(in_w), static_cast<int>(out_w), f);
    Plane cur{im.pixels, im.stride, in_w, in_h};
    std::vector<uint8_t> a, b;
    if (horizontal_first) {
        if (need_h) {  // over the rows the vertical pass reads
            const int first = cv.bounds[0];
            const int last = cv.bounds[size_t(out_h) * 2 - 2] + cv.bounds[size_t(out_h) * 2 - 1];
            for (int64_t i = 0; i < out_h; ++i) cv.bounds[size_t(i) * 2] -= first;
            cur = horizontal_pass(cur, first, last - first, ch, int(out_w), a);
        }
        if (need_v) cur = vertical_pass(cur, cv, int(out_h), b);
    } else {
        if (need_v) cur = vertical_pass(cur, cv, int(out_h), a);
        if (need_h) cur = horizontal_pass(cur, 0, int(out_h), ch, int(out_w), b);
    }
    std::vector<uint8_t> out(size_t(cur.w) * size_t(cur.h) * 3);
    for (int64_t y = 0; y < cur.h; ++y) std::copy_n(cur.data + size_t(y) * cur.stride, size_t(cur.w) * 3, &out[size_t(y * cur.w) * 3]);
    return out;
}

std::vector<int64_t> video_frame_indices(const ImageFrontEnd& fe, int64_t n, double fps, int64_t k) {
    if (n < 1) fail(OF_ERR_INPUT, "the number of video frames must be an integer in [1, 2147483648], got " + std::to_string(n));
    std::vector<int64_t> out;
    if (fe.kind != ImageFrontEnd::Kind::ImageBind) {  // media.sample_indices: round(linspace(0, n - 1, k)), halves to even
        for (double v : linspace(0.0, double(n - 1), k)) out.push_back(int64_t(std::nearbyint(v)));
        return out;
    }
    const int64_t t = fe.frames_per_clip, clips = fe.video_clips;
    if (t < 1) fail(OF_ERR_MANIFEST, "the front-end config's 'frames_per_clip' must be an integer in [1, 4096], got None");
    if (clips < 1) fail(OF_ERR_MANIFEST, "the front-end config's 'video_clips' must be an integer in [1, 4096], got None");
    if (clips > kMaxClips) fail(OF_ERR_MANIFEST, "the number of clips must be an integer in [1, 64], got " + std::to_string(clips));
    if (t > 64) fail(OF_ERR_MANIFEST, "the frames per clip must be an integer in [1, 64], got " + std::to_string(t));
    if (!(fps > 0) || !std::isfinite(fps)) fail(OF_ERR_INPUT, "the frame rate must be a positive finite number, got " + number(fps));
    // pytorchvideo 0.1.5's clip starts i * max(duration - 2, 0) / clips (exact fractions, taken to
    // the nearest double), then decord's [ceil(fps * start), min(ceil(fps * end), n)) and
    // UniformTemporalSubsample: torch.linspace(0, len - 1, t) in float32 from both ends, truncated
    const double duration = double(n) / fps;
    const long double max_start = std::max(duration - 2.0, 0.0);
    for (int64_t c = 0; c < clips; ++c) {
        const long double start = max_start * (long double)c / (long double)clips;
        const double s = double(start), e = double(start + 2.0L);
        const int64_t first = int64_t(std::ceil(fps * s));
        const int64_t stop = std::min<int64_t>(int64_t(std::ceil(fps * e)), n);
        if (stop <= first) {
            char at[32];
            std::snprintf(at, sizeof at, "%.3f", s);
            fail(OF_ERR_INPUT, "a 2.0 s clip at " + std::string(at) + " s holds no frame of a " + number(fps) + " fps video");
        }
        const int64_t len = stop - first;
        if (t == 1) {
            out.push_back(first);
            continue;
        }
        const float step = static_cast<float>(double(len - 1) / double(t - 1));
        for (int64_t i = 0; i < t; ++i) {
            float v = i < t / 2 ? 0.0f + step * static_cast<float>(i) : static_cast<float>(len - 1) - step * static_cast<float>(t - 1 - i);
            v = std::min(std::max(v, 0.0f), static_cast<float>(len - 1));
            out.push_back(first + int64_t(v));
        }
    }
    return out;
}

std::vector<float> image_item(const ImageFrontEnd& fe, const RgbView& im, std::vector<int64_t>& shape) {
    check_image(im, "image");
    switch (fe.kind) {
        case ImageFrontEnd::Kind::Resize: return resize_item(fe, im, shape);
        case ImageFrontEnd::Kind::ImageBind: return imagebind_item(fe, im, shape);
        default: return clip_item(fe, im, shape);
    }
}

std::vector<float> video_items(const ImageFrontEnd& fe, const RgbView* frames, size_t n, std::vector<int64_t>& shape) {
    if (!frames || n == 0) fail(OF_ERR_INVALID_ARGUMENT, "a video needs at least one frame");
    for (size_t i = 0; i < n; ++i) check_image(frames[i], "video frame");
    std::vector<float> out;
    if (fe.kind != ImageFrontEnd::Kind::ImageBind) {  // each frame as an image, stacked
        std::vector<int64_t> item;
        for (size_t i = 0; i < n; ++i) {
            std::vector<float> x = image_item(fe, frames[i], item);
            if (i == 0) shape = item;
            if (item != shape) fail(OF_ERR_INPUT, "the video's frames preprocess to different sizes");
            out.insert(out.end(), x.begin(), x.end());
        }
        shape.insert(shape.begin(), int64_t(n));
        return out;
    }
    const int64_t t = fe.frames_per_clip;
    if (t < 1) fail(OF_ERR_MANIFEST, "the front-end config's 'frames_per_clip' must be an integer in [1, 4096], got None");
    if (n % size_t(t) != 0 || n / size_t(t) > size_t(kMaxClips))
        fail(OF_ERR_INPUT, "ImageBind's video transform takes 1 to " + std::to_string(kMaxClips) + " clips of " + std::to_string(t) +
                               " frames each, got " + std::to_string(n) + " frames");
    for (size_t c = 0; c < n / size_t(t); ++c) {
        const RgbView* clip = frames + c * size_t(t);
        for (int64_t f = 1; f < t; ++f)
            if (clip[f].width != clip[0].width || clip[f].height != clip[0].height)
                fail(OF_ERR_INPUT, "a clip needs frames of one size, got " + dims(clip[0].width, clip[0].height) + " and " +
                                       dims(clip[f].width, clip[f].height));
        imagebind_clip(clip, t, fe.size, out);
    }
    shape = {int64_t(n / size_t(t)) * 3, 3, t, fe.size, fe.size};
    return out;
}

}  // namespace omniforge
