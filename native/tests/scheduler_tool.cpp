// The schedulers alone (src/schedulers.cpp compiled in): reads a JSON list of cases from stdin, each
// {"config": <scheduler_config.json>, "scheduler": "ddim"|"euler"|"dpm", "steps": N,
//  "sample": [...], "outputs": [[...] per step]}, and prints a JSON list holding, per case, either
// {"timesteps", "init_noise_sigma", "max_steps", "scaled": [per step], "samples": [per step]}
// (scale_model_input and step applied to the sample in turn) or {"status", "error"}: the refusal.
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "schedulers.hpp"

int main() {
    using nlohmann::json;
    std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    json cases = json::parse(text);
    json out = json::array();
    try {
        for (const json& c : cases) {
            try {
                omniforge::SchedulerConfig cfg = omniforge::SchedulerConfig::from_json(c.at("config"));
                omniforge::SchedulerKind kind = omniforge::scheduler_kind(c.at("scheduler").get<std::string>());
                const int64_t top = omniforge::max_steps(kind, cfg);
                omniforge::Scheduler s(kind, cfg, cfg.table(), top);
                s.set_timesteps(c.at("steps").get<int64_t>());
                std::vector<float> x = c.at("sample").get<std::vector<float>>();
                std::vector<float> scaled(x.size());
                json r = {{"timesteps", s.timesteps()}, {"init_noise_sigma", s.init_noise_sigma()}, {"max_steps", top}};
                json scaled_all = json::array(), samples = json::array();
                const json& outputs = c.at("outputs");
                for (size_t i = 0; i < s.timesteps().size() && i < outputs.size(); ++i) {
                    std::vector<float> mo = outputs[i].get<std::vector<float>>();
                    s.scale_model_input(x.data(), scaled.data(), x.size(), i);
                    scaled_all.push_back(scaled);
                    s.step(mo.data(), i, x.data(), x.size());
                    samples.push_back(x);
                }
                r["scaled"] = scaled_all;
                r["samples"] = samples;
                out.push_back(r);
            } catch (const omniforge::Error& e) {
                out.push_back({{"status", int(e.status)}, {"error", e.what()}});
            }
        }
    } catch (const std::exception& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    std::cout << out.dump() << "\n";
    return 0;
}
