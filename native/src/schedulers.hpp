// The diffusion schedulers of omniforge/runtime/schedulers.py in C++: DDIM (eta 0), Euler
// discrete and DPM-Solver++ 2M, configured from a diffusers scheduler_config.json (the build's
// configs/<modality>_scheduler.json) with the same checks and sentences, and computed step by step
// in the precisions numpy computes them in (float32 arrays; Python floats, which numpy casts to
// float32 before they meet an array; float64 where a numpy float64 scalar meets one).
// Everything here may throw omniforge::Error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace omniforge {

// ``v`` as an integer in [lo, hi] (a float with an integral value counts, as Python's checks
// accept 2.0), into ``out``; false otherwise. Shared by the scheduler and decoder config readers.
bool int_in_range(nlohmann::json v, int64_t lo, int64_t hi, int64_t* out);
// np.linspace(start, stop, num) in float64, as numpy computes it (the last value exactly stop).
std::vector<double> linspace(double start, double stop, int64_t num);

constexpr int64_t kMaxTrainTimesteps = 10000;  // MAX_TRAIN_TIMESTEPS
constexpr double kMinAlphaCumprod = 1e-20;     // MIN_ALPHA_CUMPROD

struct SchedulerConfig {
    int64_t num_train_timesteps = 1000;
    double beta_start = 0.0001, beta_end = 0.02;
    std::string beta_schedule = "linear";     // linear | scaled_linear
    std::string prediction_type = "epsilon";  // epsilon | v_prediction
    std::string timestep_spacing = "leading"; // leading | trailing | linspace
    int64_t steps_offset = 0;
    bool set_alpha_to_one = true, clip_sample = false;
    double clip_sample_range = 1.0;
    std::vector<double> alphas_cumprod;  // the exporter's stored table; empty: computed from the betas

    // SchedulerConfig.from_dict: every value checked; a refusal is OF_ERR_MANIFEST with the
    // Python runtime's sentence.
    static SchedulerConfig from_json(const nlohmann::json& d);
    // alphas_cumprod_table(): the stored table as float32, else cumprod(1 - betas) in float64.
    std::vector<float> table() const;
};

enum class SchedulerKind { ddim = 0, euler = 1, dpm = 2 };

// "ddim", "euler", "dpm"; another name is OF_ERR_INVALID_ARGUMENT ("unknown scheduler ...").
SchedulerKind scheduler_kind(const std::string& name);
const char* scheduler_name(SchedulerKind kind);

// The timesteps num_steps steps visit, highest first (not yet checked): Scheduler.schedule.
std::vector<double> schedule(SchedulerKind kind, const SchedulerConfig& c, int64_t num_steps);
// Scheduler.max_steps: the largest count such that every count from 1 up to it is usable.
int64_t max_steps(SchedulerKind kind, const SchedulerConfig& c);

// One denoising run's scheduler (its state is the run's own).
class Scheduler {
  public:
    // table: c.table(); top: max_steps(kind, c) (both computed once per config by the caller).
    Scheduler(SchedulerKind kind, const SchedulerConfig& c, std::vector<float> table, int64_t top);
    // set_timesteps: refuses a count outside [1, top] with check_steps' sentence.
    void set_timesteps(int64_t num_steps);
    const std::vector<double>& timesteps() const { return timesteps_; }
    double init_noise_sigma() const { return init_noise_sigma_; }
    // out = scale_model_input(sample, i) (n floats).
    void scale_model_input(const float* sample, float* out, size_t n, size_t i) const;
    // sample = step(model_output, i, sample), in place (n floats).
    void step(const float* model_output, size_t i, float* sample, size_t n);

  private:
    SchedulerKind kind_;
    SchedulerConfig c_;
    std::vector<float> ac_;  // alphas_cumprod, float32
    int64_t top_ = 0, num_steps_ = 0;
    std::vector<double> timesteps_;
    std::vector<float> sigmas_;  // Euler and DPM: the interpolated sigmas and a final 0
    double init_noise_sigma_ = 1.0;
    std::vector<float> prev_x0_;  // DPM: the previous step's data prediction
    int lower_order_nums_ = 0;
};

}  // namespace omniforge
