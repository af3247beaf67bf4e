// A build's JSON config files (the front ends', schedulers', VAE's, vocoder's) and their values,
// checked as the Python runtime's media.config_* helpers check them: one OF_ERR_MANIFEST sentence
// naming the config, the key and what it must be.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace omniforge {

// A config file of the build (its manifest's files[role]), verified as read and parsed (manifest.cpp).
nlohmann::json read_config(const BuildImpl& b, const std::string& role);

std::string number(double x);                  // as a message shows a float: nan, inf or JSON's digits
std::string py_shown(const nlohmann::json& v);  // as Python's repr shows a config value, cut short

// media.config_int: cfg[key] (else `def`) as an integer in [lo, hi] (an integral float too)
int64_t config_int(const nlohmann::json& cfg, const std::string& key, int64_t lo, int64_t hi, const std::string& what,
                   const nlohmann::json& def);
// media.config_float: a finite number of magnitude at most 1e6 (and, if nonzero, at least 1e-6)
double config_float(const nlohmann::json& cfg, const std::string& key, const std::string& what, double def,
                    bool nonzero = false);
// media.config_bool: true or false, nothing else
bool config_bool(const nlohmann::json& cfg, const std::string& key, const std::string& what, bool def);
// media._config_section: cfg[key] as an object ({} when absent)
nlohmann::json config_section(const nlohmann::json& cfg, const std::string& key, const std::string& what);
// pipeline._size: a front end's positive integer setting (an integer, not a float) in [1, hi]
int64_t front_size(const nlohmann::json& cfg, const std::string& key, int64_t hi = 4096);
// a list of 1 to 64 integers in [1, hi]
void size_list(const nlohmann::json& cfg, const std::string& key, const std::string& what, int64_t hi);

}  // namespace omniforge
