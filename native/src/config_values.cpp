// A build's JSON config values, checked as the Python runtime checks them (config_values.hpp).
#include "config_values.hpp"

#include <cmath>

#include "schedulers.hpp"

namespace omniforge {

using json = nlohmann::json;

namespace {
constexpr double kMaxConfigFloat = 1e6, kMinConfigDivisor = 1e-6;  // media.MAX_CONFIG_FLOAT, MIN_CONFIG_DIVISOR
}  // namespace

std::string number(double x) {
    if (std::isnan(x)) return "nan";
    if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
    return json(x).dump();
}

namespace {
// Python's repr of a JSON value: 'text', True, None, [1, 2], {'a': 1}
std::string py_repr(const json& v) {
    if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
    if (v.is_null()) return "None";
    if (v.is_string()) return "'" + v.get<std::string>() + "'";
    if (v.is_array() || v.is_object()) {
        std::string r = v.is_array() ? "[" : "{";
        bool first = true;
        for (auto it = v.begin(); it != v.end(); ++it) {
            if (!first) r += ", ";
            first = false;
            if (v.is_object()) r += "'" + it.key() + "': ";
            r += py_repr(*it);
        }
        return r + (v.is_array() ? "]" : "}");
    }
    return v.dump();
}
}  // namespace

std::string py_shown(const json& v) {
    const std::string r = py_repr(v);
    return r.size() <= 60 ? r : r.substr(0, 40) + "... (" + std::to_string(r.size()) + " characters)";
}

int64_t config_int(const json& cfg, const std::string& key, int64_t lo, int64_t hi, const std::string& what, const json& def) {
    auto it = cfg.find(key);
    const json& v = it == cfg.end() ? def : *it;
    int64_t out = 0;
    if (!int_in_range(v, lo, hi, &out))
        fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be an integer in [" + std::to_string(lo) + ", " +
                                  std::to_string(hi) + "], got " + py_shown(v));
    return out;
}

double config_float(const json& cfg, const std::string& key, const std::string& what, double def, bool nonzero) {
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json(def) : *it;
    const bool ok = v.is_number() && std::isfinite(v.get<double>()) && std::fabs(v.get<double>()) <= kMaxConfigFloat &&
                    (!nonzero || std::fabs(v.get<double>()) >= kMinConfigDivisor);
    if (!ok)
        fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be " +
                                  (nonzero ? "a finite, non-zero number of magnitude in [1e-06, 1e+06]"
                                           : "a finite number in [-1e+06, 1e+06]") +
                                  ", got " + py_shown(v));
    return v.get<double>();
}

bool config_bool(const json& cfg, const std::string& key, const std::string& what, bool def) {
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json(def) : *it;
    if (!v.is_boolean()) fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be true or false, got " + py_shown(v));
    return v.get<bool>();
}

json config_section(const json& cfg, const std::string& key, const std::string& what) {
    auto it = cfg.find(key);
    if (it == cfg.end()) return json::object();
    if (!it->is_object()) fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be an object, got " + py_shown(*it));
    return *it;
}

// pipeline._size: a positive integer of a front-end config (an integer, not a float)
int64_t front_size(const json& cfg, const std::string& key, int64_t hi) {
    auto it = cfg.find(key);
    const json v = it == cfg.end() ? json() : *it;
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi)) || v.get<int64_t>() < 1 ||
        v.get<int64_t>() > hi)
        fail(OF_ERR_MANIFEST, "the front-end config's '" + key + "' must be an integer in [1, " + std::to_string(hi) + "], got " + py_shown(v));
    return v.get<int64_t>();
}

void size_list(const json& cfg, const std::string& key, const std::string& what, int64_t hi) {
    const json& v = cfg[key];
    if (!v.is_array() || v.empty() || v.size() > 64)
        fail(OF_ERR_MANIFEST, "the " + what + " config's '" + key + "' must be a list of 1 to 64 integers, got " + py_shown(v));
    for (const json& x : v) config_int(json{{key, x}}, key, 1, hi, what, json());
}

}  // namespace omniforge
