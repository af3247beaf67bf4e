// The image front ends in C++: what the Python runtime computes from an RGB image (or a video's
// frames) before the image encoder, reproduced bit for bit where it is integer arithmetic (Pillow's
// resampling) and in the same float32 operations elsewhere.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace omniforge {

// An RGB image, 8 bits per channel: `height` rows `stride` bytes apart, each `width` pixels R G B.
struct RgbView {
    const uint8_t* pixels = nullptr;
    int64_t width = 0, height = 0;
    size_t stride = 0;
};

// A build's image_preprocessor.json, checked as the Python runtime reads it.
struct ImageFrontEnd {
    enum class Kind { Clip, Resize, ImageBind } kind = Kind::Clip;
    // Clip: media.ImagePreprocessing; Resize: image_frontends.resize_normalize (height x width,
    // no crop); ImageBind: imagebind_media.image_clip / clips_from_frames (size, frames_per_clip)
    int64_t shortest_edge = 224, crop_h = 224, crop_w = 224;
    int resample = 3;  // Pillow 13's filter number: 0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming, 6-7 MKS
    bool do_resize = true, do_center_crop = true, do_normalize = true;
    double rescale = 1.0 / 255.0;
    float mean[3] = {0.5f, 0.5f, 0.5f}, std[3] = {0.5f, 0.5f, 0.5f};
    int64_t height = 0, width = 0;            // Resize
    int64_t size = 224, frames_per_clip = 2, video_clips = 5;  // ImageBind (0: not in the config)

    static ImageFrontEnd from_config(const nlohmann::json& cfg);
};

// Pillow's Image.resize of an RGB image to out_w x out_h with `filter` (its Resample.c and, for
// nearest, its affine scaling): (out_h, out_w, 3) bytes.
std::vector<uint8_t> pillow_resize(const RgbView& im, int64_t out_w, int64_t out_h, int filter);

// One image -> the image encoder's input for it (what Pipeline.encode_image feeds for one image):
// (3, H, W), or ImageBind's 2-frame clip (3, 2, size, size). `shape` gets its shape.
std::vector<float> image_item(const ImageFrontEnd& fe, const RgbView& im, std::vector<int64_t>& shape);

// A video's frames, already picked, -> the image encoder's batch as Pipeline.encode_video makes it:
// each frame as image_item (CLIP, BLIP), or ImageBind's clips of frames_per_clip consecutive frames,
// each short side scaled (bilinear) and cut into 3 crops -> (clips * 3, 3, frames_per_clip, size, size).
std::vector<float> video_items(const ImageFrontEnd& fe, const RgbView* frames, size_t n, std::vector<int64_t>& shape);

// The frames of a decoded video (n_frames at fps) the Python runtime encodes, in order: `k` evenly
// spaced (media.sample_indices; k is the video decoder's frame count), or ImageBind's clips' frames
// (imagebind_media.video_frame_indices), clip after clip.
std::vector<int64_t> video_frame_indices(const ImageFrontEnd& fe, int64_t n_frames, double fps, int64_t k);

}  // namespace omniforge
