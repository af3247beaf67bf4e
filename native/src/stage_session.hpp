// A stage of the build run on float32 tensors (stage_session.cpp): what the encoders and the
// diffusion decoders open and run, and the stage shapes their manifest entries describe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "internal.hpp"
#include "ort_session.hpp"

namespace omniforge {

std::string shape_str(const std::vector<int64_t>& s);  // as Python prints a tuple
size_t product(const std::vector<int64_t>& s);
bool all_finite(const float* p, size_t n);
// OF_ERR_INVALID_ARGUMENT unless "image", "video" or "audio": "unknown modality 'x' (<what> image, ...)"
void check_media_modality(const std::string& modality, const std::string& what);

// What the C++ manifest reader does not keep of a pipeline stage: its dims (name -> opt), its
// component and its inputs' named sizes. Read again from manifest.json, and checked to describe
// the tensors the build was opened with.
struct StageDims {
    std::string component;
    std::map<std::string, int64_t> opt;
    std::vector<std::vector<std::string>> input_dims;  // per input: "" for a static size, else the dim's name
};
StageDims stage_dims(const BuildImpl& b, const std::string& stage);
// TensorSpec.concrete_shape(sizes) for input i of a stage.
std::vector<int64_t> concrete(const StageSpec& spec, const StageDims& dims, size_t i, const std::map<std::string, int64_t>& sizes);

// A stage's served variant in a session, with the names it binds; every input float32.
struct StageSession {
    std::string name, file;
    Ort::Session session{nullptr};
    std::vector<std::string> inputs, outputs;
};
StageSession open_stage(const std::shared_ptr<BuildImpl>& b, const std::string& name);
// Runs a stage on float32 inputs (in its input order); returns its first output (or `output`)
// with its shape. An ONNX Runtime failure is OF_ERR_ENGINE naming the stage.
std::vector<float> run_stage(StageSession& s, const std::vector<std::pair<const float*, std::vector<int64_t>>>& feeds,
                             std::vector<int64_t>& out_shape, const std::string& output = "");

}  // namespace omniforge
