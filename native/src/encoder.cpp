// Media in: one modality's encoder and input projector, as the Python runtime's
// Pipeline.encode_image / encode_video / encode_audio compute them from the front end's output
// (the preprocessed pixels, clips or audio features), and, for images and video frames, from RGB
// pixels through the build's image front end (image_frontend.cpp).
#include <algorithm>
#include <optional>

#include "audio_frontend.hpp"
#include "config_values.hpp"
#include "image_frontend.hpp"
#include "internal.hpp"
#include "stage_session.hpp"

namespace omniforge {

struct EncoderImpl {
    std::shared_ptr<BuildImpl> build;
    std::string modality;
    StageSession encoder, projector;
    std::vector<int64_t> item_shape;  // one item of the encoder's input (batch 1)
    size_t item_size = 0;
    size_t tokens = 1;  // rows per medium: 1 for a pooled embedding, Q for (batch, Q, D) tokens
    size_t enc_dim = 0, width = 0;
    // image and video: the build's image front end, or why it cannot be used (reported by the
    // calls that take pixels, so that a build without one still encodes preprocessed input)
    std::optional<ImageFrontEnd> image_fe;
    of_status image_fe_status = OF_OK;
    std::string image_fe_error;
    int64_t video_frames = 4;  // frames a video gives (Pipeline.video_frames): the video decoder's count
    std::optional<AudioFrontEnd> audio_fe;  // audio: the build's audio front end, the same way
    of_status audio_fe_status = OF_OK;
    std::string audio_fe_error;
};

namespace {

// The encoder output's static sizes after the batch: (D) or (Q, D).
std::vector<int64_t> static_tail(const StageSpec& spec) {
    if (spec.io.outputs.empty()) fail(OF_ERR_MANIFEST, "stage '" + spec.name + "' declares no output");
    const std::vector<int64_t>& s = spec.io.outputs[0].shape;
    if (s.size() != 2 && s.size() != 3)
        fail(OF_ERR_UNSUPPORTED, "stage '" + spec.name + "' gives a rank-" + std::to_string(s.size()) +
                                     " output; an encoder gives (batch, D) or (batch, tokens, D)");
    std::vector<int64_t> tail(s.begin() + 1, s.end());
    for (int64_t d : tail)
        if (d < 1) fail(OF_ERR_UNSUPPORTED, "stage '" + spec.name + "' output has a dynamic size after the batch");
    return tail;
}

}  // namespace

std::shared_ptr<EncoderImpl> open_encoder(std::shared_ptr<BuildImpl> build, const std::string& modality) {
    check_media_modality(modality, "the encoders take");
    const Manifest& m = build->manifest;
    const std::string base = modality == "video" ? "image" : modality;
    const std::string enc = base + "_encoder";
    if (!m.stages.count(enc) || !m.pipeline.count(enc))
        fail(OF_ERR_UNSUPPORTED, "this build cannot take " + modality + " input: it has no '" + enc + "' stage");
    // its own projector, else the shared one (Pipeline._project)
    std::string proj = base + "_input_projector";
    if (!m.stages.count(proj)) proj = "input_projector";
    if (!m.stages.count(proj) || !m.pipeline.count(proj))
        fail(OF_ERR_UNSUPPORTED, "this build has no input projector for '" + enc + "'");

    auto e = std::make_shared<EncoderImpl>();
    e->modality = modality;
    const StageSpec& spec = m.spec(enc);
    if (spec.io.inputs.size() != 1) fail(OF_ERR_UNSUPPORTED, "stage '" + enc + "' does not take one input tensor");
    const StageDims dims = stage_dims(*build, enc);
    if (dims.input_dims[0].empty() || dims.input_dims[0][0] != "batch")
        fail(OF_ERR_UNSUPPORTED, "stage '" + enc + "' input does not lead with the 'batch' dim");
    std::map<std::string, int64_t> sizes = dims.opt;
    sizes["batch"] = 1;
    e->item_shape = concrete(spec, dims, 0, sizes);
    e->item_size = product(e->item_shape);
    const std::vector<int64_t> tail = static_tail(spec);
    e->tokens = tail.size() == 2 ? size_t(tail[0]) : 1;
    e->enc_dim = size_t(tail.back());

    const StageSpec& pspec = m.spec(proj);
    if (pspec.io.inputs.size() != 1 || pspec.io.inputs[0].shape.size() != 3 || pspec.io.outputs.empty() ||
        pspec.io.outputs[0].shape.size() != 3)
        fail(OF_ERR_UNSUPPORTED, "stage '" + proj + "' does not map (batch, tokens, D) features to (batch, tokens, H) rows");
    if (pspec.io.inputs[0].shape[2] != int64_t(e->enc_dim))
        fail(OF_ERR_MANIFEST, "stage '" + proj + "' takes " + std::to_string(pspec.io.inputs[0].shape[2]) + " features; '" + enc +
                                  "' gives " + std::to_string(e->enc_dim));
    if (pspec.io.outputs[0].shape[2] < 1) fail(OF_ERR_UNSUPPORTED, "stage '" + proj + "' gives rows of a dynamic width");
    e->width = size_t(pspec.io.outputs[0].shape[2]);

    try {
        if (base == "image") e->image_fe = ImageFrontEnd::from_config(read_config(*build, "image_preprocessor"));
        if (base == "audio") e->audio_fe = AudioFrontEnd::from_config(read_config(*build, "audio_frontend"));
    } catch (const Error& err) {
        (base == "image" ? e->image_fe_status : e->audio_fe_status) = err.status;
        (base == "image" ? e->image_fe_error : e->audio_fe_error) = err.what();
    }
    if (modality == "video" && m.stages.count("video_unet")) {
        const StageDims unet = stage_dims(*build, "video_unet");
        auto it = unet.opt.find("frames");
        if (it == unet.opt.end() || it->second < 1 || it->second > 256)
            fail(OF_ERR_MANIFEST, "stage 'video_unet' needs a 'frames' dim of 1 to 256 frames to sample a video by");
        e->video_frames = it->second;
    }
    e->encoder = open_stage(build, enc);
    e->projector = open_stage(build, proj);
    e->build = std::move(build);
    return e;
}

const std::string& encoder_modality(const EncoderImpl& e) { return e.modality; }
const std::string& encoder_input_name(const EncoderImpl& e) { return e.encoder.inputs[0]; }
const std::vector<int64_t>& encoder_input_shape(const EncoderImpl& e) { return e.item_shape; }
void encoder_rows(const EncoderImpl& e, size_t* n_rows, size_t* width) {
    *n_rows = e.tokens;
    *width = e.width;
}

void encode(EncoderImpl& e, const float* input, size_t n_input, int64_t batch, float* rows, size_t n_rows) {
    if (!input) fail(OF_ERR_INVALID_ARGUMENT, "the encoder input is a null pointer");
    if (!rows) fail(OF_ERR_INVALID_ARGUMENT, "the rows buffer is a null pointer");
    if (batch < 1 || batch > 4096) fail(OF_ERR_INVALID_ARGUMENT, "batch must be in [1, 4096], got " + std::to_string(batch));
    std::vector<int64_t> shape = e.item_shape;
    shape[0] = batch;
    if (n_input != size_t(batch) * e.item_size)
        fail(OF_ERR_INPUT, "the " + e.modality + " encoder's '" + e.encoder.inputs[0] + "' must hold " +
                               std::to_string(size_t(batch) * e.item_size) + " floats (shape " + shape_str(shape) + "), got " +
                               std::to_string(n_input));
    if (!all_finite(input, n_input)) fail(OF_ERR_INPUT, "the " + e.modality + " encoder's input holds NaN or infinite values");
    if (n_rows != e.tokens * e.width)
        fail(OF_ERR_INVALID_ARGUMENT, "the rows buffer must hold " + std::to_string(e.tokens * e.width) + " floats (" +
                                          std::to_string(e.tokens) + " x " + std::to_string(e.width) + "), got " +
                                          std::to_string(n_rows));
    std::vector<int64_t> out_shape;
    std::vector<float> emb = run_stage(e.encoder, {{input, shape}}, out_shape);
    const size_t item = e.tokens * e.enc_dim;
    if (emb.size() != size_t(batch) * item || out_shape.empty() || out_shape[0] != batch)
        fail(OF_ERR_ENGINE, "stage '" + e.encoder.name + "' gave " + shape_str(out_shape) + " for an input of " + shape_str(shape));
    // the mean over the batch (a video's frames or clips, an audio's clips), as numpy's
    // emb.mean(axis=0) in float32: summed item by item, divided once
    std::vector<float> mean(emb.begin(), emb.begin() + long(item));
    for (int64_t b = 1; b < batch; ++b)
        for (size_t k = 0; k < item; ++k) mean[k] += emb[size_t(b) * item + k];
    if (batch > 1)
        for (float& v : mean) v /= static_cast<float>(batch);
    std::vector<int64_t> proj_shape;
    std::vector<float> out = run_stage(e.projector, {{mean.data(), {1, int64_t(e.tokens), int64_t(e.enc_dim)}}}, proj_shape);
    if (out.size() != e.tokens * e.width)
        fail(OF_ERR_ENGINE, "stage '" + e.projector.name + "' gave " + shape_str(proj_shape) + " for " + std::to_string(e.tokens) +
                                " row(s)");
    std::copy(out.begin(), out.end(), rows);
}

void front_end_shape_check(const EncoderImpl& e, const std::vector<int64_t>& item) {
    std::vector<int64_t> want(e.item_shape.begin() + 1, e.item_shape.end());
    if (item != want)
        fail(OF_ERR_UNSUPPORTED, "the build's " + std::string(e.modality == "audio" ? "audio" : "image") + " front end gives " +
                                     shape_str(item) + " per item; the " + e.modality +
                                     " encoder takes " + shape_str(want));
}

const ImageFrontEnd& image_front_end(const EncoderImpl& e) {
    if (e.modality == "audio") fail(OF_ERR_UNSUPPORTED, "the audio encoder takes audio features, not pixels");
    if (!e.image_fe) fail(e.image_fe_status, "the build's image front end cannot be used: " + e.image_fe_error);
    return *e.image_fe;
}

void image_input(EncoderImpl& e, const RgbView& image, float* input, size_t n_input) {
    const ImageFrontEnd& fe = image_front_end(e);
    if (!input) fail(OF_ERR_INVALID_ARGUMENT, "the input buffer is a null pointer");
    std::vector<int64_t> shape;
    const std::vector<float> x = image_item(fe, image, shape);
    front_end_shape_check(e, shape);
    if (n_input != x.size())
        fail(OF_ERR_INVALID_ARGUMENT, "the input buffer must hold " + std::to_string(x.size()) + " floats (one item, shape " +
                                          shape_str(e.item_shape) + "), got " + std::to_string(n_input));
    std::copy(x.begin(), x.end(), input);
}

void encode_images(EncoderImpl& e, const RgbView* images, size_t n, float* rows, size_t n_rows) {
    const ImageFrontEnd& fe = image_front_end(e);
    if (!images) fail(OF_ERR_INVALID_ARGUMENT, "the images are a null pointer");
    if (e.modality == "image" && n != 1) fail(OF_ERR_INVALID_ARGUMENT, "the image encoder takes one image per call, got " + std::to_string(n));
    std::vector<int64_t> shape;
    std::vector<float> x;
    if (e.modality == "image") {
        x = image_item(fe, images[0], shape);
        shape.insert(shape.begin(), 1);
    } else {
        x = video_items(fe, images, n, shape);
    }
    front_end_shape_check(e, std::vector<int64_t>(shape.begin() + 1, shape.end()));
    encode(e, x.data(), x.size(), shape[0], rows, n_rows);
}

std::vector<int64_t> video_frames(const EncoderImpl& e, int64_t n_frames, double fps) {
    if (e.modality != "video") fail(OF_ERR_UNSUPPORTED, "the " + e.modality + " encoder takes no video frames");
    return video_frame_indices(image_front_end(e), n_frames, fps, e.video_frames);
}

const AudioFrontEnd& audio_front_end(const EncoderImpl& e) {
    if (e.modality != "audio") fail(OF_ERR_UNSUPPORTED, "the " + e.modality + " encoder takes pixels, not audio samples");
    if (!e.audio_fe) fail(e.audio_fe_status, "the build's audio front end cannot be used: " + e.audio_fe_error);
    return *e.audio_fe;
}

std::vector<float> audio_batch(EncoderImpl& e, const float* samples, size_t n, int32_t sample_rate, int64_t* batch) {
    std::vector<int64_t> shape;
    std::vector<float> x = audio_items(audio_front_end(e), samples, n, sample_rate, shape);
    front_end_shape_check(e, std::vector<int64_t>(shape.begin() + 1, shape.end()));
    *batch = shape[0];
    return x;
}

void audio_input(EncoderImpl& e, const float* samples, size_t n, int32_t sample_rate, float* input, size_t n_input, int64_t* batch) {
    const AudioFrontEnd& fe = audio_front_end(e);
    if (!batch) fail(OF_ERR_INVALID_ARGUMENT, "batch is a null pointer");
    *batch = fe.kind == AudioFrontEnd::Kind::ImageBind ? fe.clips : 1;
    if (!input && n_input == 0) return;  // a size query
    if (!input) fail(OF_ERR_INVALID_ARGUMENT, "the input buffer is a null pointer");
    const std::vector<float> x = audio_batch(e, samples, n, sample_rate, batch);
    if (n_input != x.size())
        fail(OF_ERR_INVALID_ARGUMENT, "the input buffer must hold " + std::to_string(x.size()) + " floats (" + std::to_string(*batch) +
                                          " item(s) of shape " + shape_str(e.item_shape) + "), got " + std::to_string(n_input));
    std::copy(x.begin(), x.end(), input);
}

void encode_audio(EncoderImpl& e, const float* samples, size_t n, int32_t sample_rate, float* rows, size_t n_rows) {
    int64_t batch = 0;
    const std::vector<float> x = audio_batch(e, samples, n, sample_rate, &batch);
    encode(e, x.data(), x.size(), batch, rows, n_rows);
}

}  // namespace omniforge
