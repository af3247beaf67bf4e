// DDIM, Euler discrete and DPM-Solver++ 2M as omniforge/runtime/schedulers.py computes them.
#include "schedulers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace omniforge {

using json = nlohmann::json;

bool int_in_range(json v, int64_t lo, int64_t hi, int64_t* out) {
    if (v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>()) &&
        std::fabs(v.get<double>()) < 9.2e18)
        v = static_cast<int64_t>(v.get<double>());
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))) return false;
    *out = v.get<int64_t>();
    return lo <= *out && *out <= hi;
}

std::vector<double> linspace(double start, double stop, int64_t num) {
    std::vector<double> y(static_cast<size_t>(std::max<int64_t>(num, 0)));
    const int64_t div = num - 1;
    const double delta = stop - start;
    for (int64_t i = 0; i < num; ++i) {
        double v = static_cast<double>(i);
        if (div > 0) {
            const double step = delta / static_cast<double>(div);
            v = step == 0 ? v / static_cast<double>(div) * delta : v * step;
        } else {
            v = v * delta;
        }
        y[size_t(i)] = v + start;
    }
    if (num > 1) y.back() = stop;
    return y;
}

namespace {

[[noreturn]] void bad(const std::string& message) { fail(OF_ERR_MANIFEST, message); }

// Python's type name of a JSON value (what the Python runtime's messages show).
const char* py_type(const json& v) {
    switch (v.type()) {
        case json::value_t::object: return "dict";
        case json::value_t::array: return "list";
        case json::value_t::string: return "str";
        case json::value_t::boolean: return "bool";
        case json::value_t::number_float: return "float";
        case json::value_t::null: return "NoneType";
        default: return "int";
    }
}

std::string py_repr(const json& v) {
    switch (v.type()) {
        case json::value_t::null: return "None";
        case json::value_t::boolean: return v.get<bool>() ? "True" : "False";
        case json::value_t::string: {
            const std::string s = v.get<std::string>();
            const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
            std::string out(1, q);
            for (char c : s) {
                if (c == '\\' || c == q) out += '\\';
                if (static_cast<unsigned char>(c) < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
                    out += buf;
                } else {
                    out += c;
                }
            }
            return out + q;
        }
        case json::value_t::array: {
            std::string out = "[";
            for (size_t i = 0; i < v.size() && out.size() < 200; ++i) out += (i ? ", " : "") + py_repr(v[i]);
            return out + "]";
        }
        case json::value_t::object: {
            std::string out = "{";
            bool first = true;
            for (auto& [k, x] : v.items()) {
                if (out.size() >= 200) break;
                out += (first ? "'" : ", '") + k + "': " + py_repr(x);
                first = false;
            }
            return out + "}";
        }
        default: return v.dump();
    }
}

// _shown: a config value as a message shows it, cut short.
std::string shown(const json& v) {
    const std::string r = py_repr(v);
    return r.size() <= 60 ? r : r.substr(0, 40) + "...(" + std::to_string(r.size()) + " characters)";
}

std::string repr_float(double x) { return json(x).dump(); }

const json& get(const json& d, const char* key, const json& fallback) {
    auto it = d.find(key);
    return it == d.end() ? fallback : *it;
}

bool is_number(const json& v) { return v.is_number(); }  // nlohmann keeps booleans apart

int64_t get_int(const json& d, const char* key, int64_t def, int64_t lo, int64_t hi) {
    const json dj = def;
    const json& v = get(d, key, dj);
    int64_t out = 0;
    if (!int_in_range(v, lo, hi, &out))
        bad(std::string("the scheduler config's '") + key + "' must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
            "], got " + shown(v));
    return out;
}

double get_float(const json& d, const char* key, double def) {
    const json dj = def;
    const json& v = get(d, key, dj);
    if (!is_number(v) || !std::isfinite(v.get<double>()))
        bad(std::string("the scheduler config's '") + key + "' must be a finite number, got " + shown(v));
    return v.get<double>();
}

bool get_bool(const json& d, const char* key, bool def) {
    const json dj = def;
    const json& v = get(d, key, dj);
    if (!v.is_boolean()) bad(std::string("the scheduler config's '") + key + "' must be true or false, got " + shown(v));
    return v.get<bool>();
}

std::string get_choice(const json& d, const char* key, const char* def, std::initializer_list<const char*> choices) {
    const json dj = def;
    const json& v = get(d, key, dj);
    std::string list;
    bool found = false;
    for (const char* c : choices) {
        list += (list.empty() ? "" : ", ") + std::string(c);
        found = found || (v.is_string() && v.get<std::string>() == c);
    }
    if (!found) bad(std::string(key) + " " + shown(v) + " is not supported (" + list + ")");
    return v.get<std::string>();
}

std::vector<double> get_table(const json& d, int64_t n) {
    auto it = d.find("alphas_cumprod");
    if (it == d.end()) return {};
    const json& v = *it;
    if (!v.is_array()) bad("the scheduler config's 'alphas_cumprod' must be a list of numbers, got " + shown(v));
    if (v.empty()) return {};
    if (static_cast<int64_t>(v.size()) != n)
        bad("the scheduler's alphas_cumprod table has " + std::to_string(v.size()) + " entries, not num_train_timesteps (" +
            std::to_string(n) + ")");
    std::vector<double> out;
    out.reserve(v.size());
    for (const json& a : v) {
        if (!is_number(a)) bad("the scheduler config's 'alphas_cumprod' must hold only numbers");
        out.push_back(a.get<double>());
    }
    return out;
}

std::string g3(double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g", x);
    return buf;
}

// _check_table: every value in [MIN_ALPHA_CUMPROD, 1) in float32, strictly decreasing.
void check_table(const std::vector<float>& t, const char* how) {
    bool ok = true;
    float lo = 0, hi = 0;
    bool any = false;
    for (float a : t) {
        if (!std::isfinite(a)) {
            ok = false;
            continue;
        }
        lo = any ? std::min(lo, a) : a;
        hi = any ? std::max(hi, a) : a;
        any = true;
    }
    // numpy compares the float32 minimum with the Python float cast to float32
    ok = ok && any && lo >= static_cast<float>(kMinAlphaCumprod) && hi < 1.0f;
    if (!ok)
        bad(std::string("the scheduler's alphas_cumprod table (") + how + ") must hold numbers in [1e-20, 1) in float32, got " +
            (any ? g3(lo) + " to " + g3(hi) : std::string("no finite values")));
    for (size_t i = 1; i < t.size(); ++i)
        if (t[i] - t[i - 1] >= 0.0f)
            bad(std::string("the scheduler's alphas_cumprod table (") + how + ") must decrease strictly with the timestep in float32");
}

double np_round(double x) { return std::nearbyint(x); }  // np.round: halves to even

// _trailing: np.round(n - arange(k) * (n / k)) - 1.
std::vector<double> trailing(int64_t n, int64_t k) {
    std::vector<double> out(static_cast<size_t>(k));
    const double r = static_cast<double>(n) / static_cast<double>(k);
    for (int64_t i = 0; i < k; ++i) out[size_t(i)] = np_round(static_cast<double>(n) - static_cast<double>(i) * r) - 1.0;
    return out;
}

// _spaced: diffusers' integer spacings (DDIM; Euler except linspace).
std::vector<double> spaced(const SchedulerConfig& c, int64_t k) {
    const int64_t n = c.num_train_timesteps;
    std::vector<double> out;
    if (c.timestep_spacing == "leading") {
        const int64_t ratio = n / k;
        for (int64_t i = k - 1; i >= 0; --i) out.push_back(static_cast<double>(i * ratio + c.steps_offset));
        return out;
    }
    if (c.timestep_spacing == "trailing") return trailing(n, k);
    std::vector<double> y = linspace(0.0, static_cast<double>(n - 1), k);
    for (auto it = y.rbegin(); it != y.rend(); ++it) out.push_back(np_round(*it));
    return out;
}

bool usable(const std::vector<double>& ts, int64_t k, int64_t n) {
    if (static_cast<int64_t>(ts.size()) != k || ts.empty()) return false;
    for (size_t i = 0; i < ts.size(); ++i) {
        if (!(ts[i] >= 0.0) || !(ts[i] <= static_cast<double>(n - 1))) return false;
        if (i && !(ts[i] - ts[i - 1] < 0.0)) return false;
    }
    return true;
}

// np.interp(x, arange(len(fp)), fp) as numpy computes it.
double interp(double x, const std::vector<float>& fp) {
    const int64_t len = static_cast<int64_t>(fp.size());
    if (std::isnan(x)) return x;
    if (x < 0) return fp.front();
    if (x >= static_cast<double>(len - 1)) return fp.back();
    const int64_t j = static_cast<int64_t>(std::floor(x));
    const double xj = static_cast<double>(j), yj = fp[size_t(j)], yj1 = fp[size_t(j + 1)];
    if (xj == x) return yj;
    const double slope = (yj1 - yj) / ((xj + 1.0) - xj);
    double r = slope * (x - xj) + yj;
    if (std::isnan(r)) {
        r = slope * (x - (xj + 1.0)) + yj1;
        if (std::isnan(r) && yj == yj1) r = yj;
    }
    return r;
}

}  // namespace

SchedulerConfig SchedulerConfig::from_json(const json& d) {
    if (!d.is_object()) bad(std::string("the scheduler config must be a JSON object, got ") + py_type(d));
    // d.get(key, ok) is not ok: false for the first three, None for trained_betas
    for (const char* key : {"thresholding", "rescale_betas_zero_snr", "use_karras_sigmas"}) {
        auto it = d.find(key);
        if (it != d.end() && !(it->is_boolean() && !it->get<bool>()))
            bad(std::string("scheduler option ") + key + "=" + shown(*it) + " is not supported by the native schedulers");
    }
    if (auto it = d.find("trained_betas"); it != d.end() && !it->is_null())
        bad("scheduler option trained_betas=" + shown(*it) + " is not supported by the native schedulers");
    const json dflt_kind = "Scheduler";
    const json& kind = get(d, "_class_name", dflt_kind);
    const std::string suffix = "Scheduler";
    if (!kind.is_string() || kind.get<std::string>().size() < suffix.size() ||
        kind.get<std::string>().compare(kind.get<std::string>().size() - suffix.size(), suffix.size(), suffix) != 0)
        bad("the scheduler config is not a scheduler's (its _class_name is " + shown(kind) + ")");
    SchedulerConfig c;
    c.num_train_timesteps = get_int(d, "num_train_timesteps", 1000, 1, kMaxTrainTimesteps);
    c.beta_start = get_float(d, "beta_start", 0.0001);
    c.beta_end = get_float(d, "beta_end", 0.02);
    if (!(0 < c.beta_start && c.beta_start <= c.beta_end && c.beta_end < 1))
        bad("the scheduler config's betas must satisfy 0 < beta_start <= beta_end < 1, got beta_start=" + repr_float(c.beta_start) +
            ", beta_end=" + repr_float(c.beta_end));
    c.beta_schedule = get_choice(d, "beta_schedule", "linear", {"linear", "scaled_linear"});
    c.prediction_type = get_choice(d, "prediction_type", "epsilon", {"epsilon", "v_prediction"});
    c.timestep_spacing = get_choice(d, "timestep_spacing", "leading", {"leading", "trailing", "linspace"});
    c.steps_offset = get_int(d, "steps_offset", 0, 0, c.num_train_timesteps - 1);
    c.set_alpha_to_one = get_bool(d, "set_alpha_to_one", true);
    c.clip_sample = get_bool(d, "clip_sample", false);
    c.clip_sample_range = get_float(d, "clip_sample_range", 1.0);
    c.alphas_cumprod = get_table(d, c.num_train_timesteps);
    if (c.clip_sample_range <= 0) bad("the scheduler config's 'clip_sample_range' must be > 0, got " + repr_float(c.clip_sample_range));
    check_table(c.table(), c.alphas_cumprod.empty() ? "computed from its betas" : "given");
    return c;
}

std::vector<float> SchedulerConfig::table() const {
    std::vector<float> out;
    if (!alphas_cumprod.empty()) {
        for (double a : alphas_cumprod) out.push_back(static_cast<float>(a));
        return out;
    }
    const int64_t n = num_train_timesteps;
    std::vector<double> betas;
    if (beta_schedule == "linear") {
        betas = linspace(beta_start, beta_end, n);
    } else {
        betas = linspace(std::pow(beta_start, 0.5), std::pow(beta_end, 0.5), n);
        for (double& b : betas) b = b * b;  // numpy's ** 2 is a square
    }
    double p = 1.0;
    for (double b : betas) {
        p *= 1.0 - b;  // np.cumprod: sequential
        out.push_back(static_cast<float>(p));
    }
    return out;
}

SchedulerKind scheduler_kind(const std::string& name) {
    if (name == "ddim") return SchedulerKind::ddim;
    if (name == "euler") return SchedulerKind::euler;
    if (name == "dpm") return SchedulerKind::dpm;
    std::string s = name.substr(0, 60);
    for (char& ch : s)
        if (static_cast<unsigned char>(ch) < 0x20) ch = '?';
    fail(OF_ERR_INVALID_ARGUMENT, "unknown scheduler '" + s + "' (choose from ddim, euler, dpm)");
}

const char* scheduler_name(SchedulerKind kind) {
    switch (kind) {
        case SchedulerKind::ddim: return "ddim";
        case SchedulerKind::euler: return "euler";
        case SchedulerKind::dpm: return "dpm";
    }
    return "";
}

std::vector<double> schedule(SchedulerKind kind, const SchedulerConfig& c, int64_t k) {
    const int64_t n = c.num_train_timesteps;
    if (kind == SchedulerKind::ddim) return spaced(c, k);
    if (kind == SchedulerKind::euler) {
        if (c.timestep_spacing != "linspace") return spaced(c, k);
        std::vector<double> y = linspace(0.0, static_cast<double>(n - 1), k);
        std::reverse(y.begin(), y.end());
        return y;
    }
    std::vector<double> out;
    if (c.timestep_spacing == "linspace") {
        std::vector<double> y = linspace(0.0, static_cast<double>(n - 1), k + 1);
        for (int64_t i = k; i >= 1; --i) out.push_back(np_round(y[size_t(i)]));
        return out;
    }
    if (c.timestep_spacing == "leading") {
        const int64_t ratio = n / (k + 1);
        for (int64_t i = k; i >= 1; --i) out.push_back(static_cast<double>(i * ratio + c.steps_offset));
        return out;
    }
    return trailing(n, k);
}

int64_t max_steps(SchedulerKind kind, const SchedulerConfig& c) {
    // only num_train_timesteps, timestep_spacing and steps_offset shape a schedule
    const int64_t n = c.num_train_timesteps;
    int64_t top = 0;
    while (top < n && usable(schedule(kind, c, top + 1), top + 1, n)) ++top;
    return top;
}

Scheduler::Scheduler(SchedulerKind kind, const SchedulerConfig& c, std::vector<float> table, int64_t top)
    : kind_(kind), c_(c), ac_(std::move(table)), top_(top) {}

void Scheduler::set_timesteps(int64_t num_steps) {
    const std::string name = scheduler_name(kind_);
    if (top_ < 1)
        fail(OF_ERR_INVALID_ARGUMENT, "the build's scheduler config leaves the " + name + " scheduler no usable step count (steps_offset " +
                                          std::to_string(c_.steps_offset) + " over " + std::to_string(c_.num_train_timesteps) +
                                          " training timesteps)");
    if (num_steps < 1 || num_steps > top_)
        fail(OF_ERR_INVALID_ARGUMENT, "steps must lie in [1, " + std::to_string(top_) + "] for the " + name + " scheduler over " +
                                          std::to_string(c_.num_train_timesteps) + " training timesteps, got " + std::to_string(num_steps));
    num_steps_ = num_steps;
    timesteps_ = schedule(kind_, c_, num_steps);
    init_noise_sigma_ = 1.0;
    if (kind_ == SchedulerKind::ddim) return;
    // ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in float32, interpolated in float64
    std::vector<float> full(ac_.size());
    for (size_t i = 0; i < ac_.size(); ++i) full[i] = std::sqrt((1.0f - ac_[i]) / ac_[i]);
    sigmas_.clear();
    for (double t : timesteps_) sigmas_.push_back(static_cast<float>(interp(t, full)));
    sigmas_.push_back(0.0f);
    if (kind_ == SchedulerKind::euler) {
        for (double& t : timesteps_) t = static_cast<float>(t);  // Euler's timesteps are float32
        const double smax = *std::max_element(sigmas_.begin(), sigmas_.end());
        init_noise_sigma_ = c_.timestep_spacing == "linspace" || c_.timestep_spacing == "trailing"
                                ? smax
                                : std::pow(std::pow(smax, 2.0) + 1.0, 0.5);
    } else {
        prev_x0_.clear();
        lower_order_nums_ = 0;
    }
}

void Scheduler::scale_model_input(const float* sample, float* out, size_t n, size_t i) const {
    if (kind_ != SchedulerKind::euler) {
        std::copy(sample, sample + n, out);
        return;
    }
    const float sigma = sigmas_[i];  // float32 scalar arithmetic, as diffusers
    const float d = std::pow(std::pow(sigma, 2.0f) + 1.0f, 0.5f);
    for (size_t k = 0; k < n; ++k) out[k] = sample[k] / d;
}

namespace {

// DPMSolverMultistepScheduler._alpha_sigma and _lambda (Python floats; the log in float32).
void alpha_sigma(double sigma, double& alpha, double& s) {
    alpha = 1.0 / std::pow(std::pow(sigma, 2.0) + 1.0, 0.5);
    s = sigma * alpha;
}
double lambda_of(double alpha, double sigma) {
    return static_cast<double>(std::log(static_cast<float>(alpha)) - std::log(static_cast<float>(sigma)));
}

}  // namespace

void Scheduler::step(const float* mo, size_t i, float* sample, size_t n) {
    if (kind_ == SchedulerKind::ddim) {
        const int64_t t = static_cast<int64_t>(timesteps_[i]);
        const int64_t prev_t = t - c_.num_train_timesteps / num_steps_;
        const double a_t = ac_[size_t(t)];
        const double final_a = c_.set_alpha_to_one ? 1.0 : static_cast<double>(ac_[0]);
        const double a_prev = prev_t >= 0 ? static_cast<double>(ac_[size_t(prev_t)]) : final_a;
        const double b_t = 1.0 - a_t;
        // Python floats meet float32 arrays as float32
        const float sa = static_cast<float>(std::pow(a_t, 0.5)), sb = static_cast<float>(std::pow(b_t, 0.5));
        const float sp = static_cast<float>(std::pow(a_prev, 0.5)), sq = static_cast<float>(std::pow(1.0 - a_prev, 0.5));
        const float r = static_cast<float>(c_.clip_sample_range);
        const bool eps_pred = c_.prediction_type == "epsilon";
        for (size_t k = 0; k < n; ++k) {
            float x0, eps;
            if (eps_pred) {
                x0 = (sample[k] - sb * mo[k]) / sa;
                eps = mo[k];
            } else {
                x0 = sa * sample[k] - sb * mo[k];
                eps = sa * mo[k] + sb * sample[k];
            }
            if (c_.clip_sample) x0 = std::min(std::max(x0, -r), r);
            sample[k] = sp * x0 + sq * eps;
        }
        return;
    }
    if (kind_ == SchedulerKind::euler) {
        const float sigma = sigmas_[i], nxt = sigmas_[i + 1], one = 1.0f;
        const bool eps_pred = c_.prediction_type == "epsilon";
        const float s2 = std::pow(sigma, 2.0f) + one;
        const float c_out = -sigma / std::pow(s2, 0.5f);
        const float dt = nxt - sigma;
        for (size_t k = 0; k < n; ++k) {
            const float x0 = eps_pred ? sample[k] - sigma * mo[k] : mo[k] * c_out + sample[k] / s2;
            const float derivative = (sample[k] - x0) / sigma;
            sample[k] = sample[k] + derivative * dt;
        }
        return;
    }
    // DPM-Solver++ 2M
    const size_t steps = timesteps_.size();
    const bool final_step = i == steps - 1;
    double alpha_s, sigma_s, alpha_t, sigma_t;
    alpha_sigma(sigmas_[i], alpha_s, sigma_s);
    alpha_sigma(sigmas_[i + 1], alpha_t, sigma_t);
    const float fa = static_cast<float>(alpha_s), fs = static_cast<float>(sigma_s);
    std::vector<float> x0(n);
    if (c_.prediction_type == "epsilon") {
        for (size_t k = 0; k < n; ++k) x0[k] = (sample[k] - fs * mo[k]) / fa;
    } else {
        for (size_t k = 0; k < n; ++k) x0[k] = fa * sample[k] - fs * mo[k];
    }
    const double lam_t = lambda_of(alpha_t, sigma_t), lam_s0 = lambda_of(alpha_s, sigma_s);
    const double h = lam_t - lam_s0;
    const double expm = std::exp(-h) - 1.0;  // a numpy float64 scalar: what it multiplies becomes float64
    const float ratio = static_cast<float>(sigma_t / sigma_s);
    const double a = alpha_t * expm;
    if (lower_order_nums_ < 1 || final_step) {
        for (size_t k = 0; k < n; ++k)
            sample[k] = static_cast<float>(static_cast<double>(ratio * sample[k]) - a * static_cast<double>(x0[k]));
    } else {
        double alpha_s1, sigma_s1;
        alpha_sigma(sigmas_[i - 1], alpha_s1, sigma_s1);
        const double r0 = (lam_s0 - lambda_of(alpha_s1, sigma_s1)) / h;
        const float inv_r0 = static_cast<float>(1.0 / r0);
        const double half = 0.5 * alpha_t * expm;
        for (size_t k = 0; k < n; ++k) {
            const float d1 = inv_r0 * (x0[k] - prev_x0_[k]);
            sample[k] = static_cast<float>(static_cast<double>(ratio * sample[k]) - a * static_cast<double>(x0[k]) -
                                           half * static_cast<double>(d1));
        }
    }
    prev_x0_ = std::move(x0);
    if (lower_order_nums_ < 2) ++lower_order_nums_;
}

}  // namespace omniforge
