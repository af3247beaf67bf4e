// The sampler alone (src/sampling.cpp compiled in): reads a JSON list of cases from stdin, each
// {"logits": [...], "history": [...], "temperature", "top_k", "top_p", "penalty", "seed", "draws"},
// and prints a JSON list holding, per case, the tokens of `draws` successive draws from one
// generator seeded with `seed` (as numpy.random.default_rng(seed) draws them).
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "internal.hpp"

int main() {
    using nlohmann::json;
    std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    json cases = json::parse(text);
    json out = json::array();
    try {
        for (const json& c : cases) {
            omniforge::SamplingConfig cfg;
            cfg.temperature = c.at("temperature").get<double>();
            cfg.top_k = c.at("top_k").get<int64_t>();
            cfg.top_p = c.at("top_p").get<double>();
            cfg.repetition_penalty = c.at("penalty").get<double>();
            cfg.seed = c.at("seed").get<uint64_t>();
            omniforge::check_sampling(cfg);
            std::vector<float> logits = c.at("logits").get<std::vector<float>>();
            std::vector<int32_t> history = c.at("history").get<std::vector<int32_t>>();
            omniforge::Rng rng(cfg.seed);
            omniforge::Sampler sampler;
            json picks = json::array();
            for (int i = 0, n = c.at("draws").get<int>(); i < n; ++i)
                picks.push_back(sampler.select(logits.data(), logits.size(), cfg, rng, history));
            out.push_back(picks);
        }
    } catch (const std::exception& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    std::cout << out.dump() << "\n";
    return 0;
}
