// One generation request through the C API, for tests/test_native.py:
//   omniforge_generate BUILD [options] [--] ID...
// options: --max N --temperature T --top-k K --top-p P --penalty R --seed S --stops ID,ID (or
// "none") --stop-string S (repeatable) --cancel-after N --slots N --text PROMPT (instead of ids).
// Prints one JSON object: tokens, finish, text, the streamed (token, text) pairs, prompt_tokens.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "omniforge.h"

namespace {

struct Stream {
    nlohmann::json events = nlohmann::json::array();
    std::string text;
    long cancel_after = -1;
};

int on_token(void* user, int32_t token, const char* text, size_t len) {
    auto* s = static_cast<Stream*>(user);
    std::string piece(text, len);
    s->text += piece;
    s->events.push_back({token, piece});
    return s->cancel_after >= 0 && static_cast<long>(s->events.size()) >= s->cancel_after;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s BUILD [options] [--] ID...\n", argv[0]);
        return 2;
    }
    of_generate_options o;
    of_generate_options_init(&o);
    Stream stream;
    std::vector<int32_t> ids, stops;
    std::vector<std::string> stop_strings;
    std::string prompt_text;
    bool have_text = false;
    int slots = 1;
    for (int i = 2; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "%s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--max") o.max_new_tokens = std::atoi(next().c_str());
        else if (a == "--temperature") o.temperature = std::strtod(next().c_str(), nullptr);
        else if (a == "--top-k") o.top_k = std::atoi(next().c_str());
        else if (a == "--top-p") o.top_p = std::strtod(next().c_str(), nullptr);
        else if (a == "--penalty") o.repetition_penalty = std::strtod(next().c_str(), nullptr);
        else if (a == "--seed") o.seed = std::strtoull(next().c_str(), nullptr, 10);
        else if (a == "--stops") {
            std::string v = next();
            o.n_stop_token_ids = 0;
            if (v != "none") {
                std::stringstream ss(v);
                for (std::string t; std::getline(ss, t, ',');) stops.push_back(std::atoi(t.c_str()));
            }
        } else if (a == "--stop-string") stop_strings.push_back(next());
        else if (a == "--cancel-after") stream.cancel_after = std::atol(next().c_str());
        else if (a == "--slots") slots = std::atoi(next().c_str());
        else if (a == "--text") {
            prompt_text = next();
            have_text = true;
        } else if (a == "--") continue;
        else ids.push_back(std::atoi(a.c_str()));
    }
    if (!stops.empty()) {
        o.stop_token_ids = stops.data();
        o.n_stop_token_ids = static_cast<int32_t>(stops.size());
    }
    std::vector<const char*> stop_ptrs;
    for (const std::string& s : stop_strings) stop_ptrs.push_back(s.c_str());
    o.stop_strings = stop_ptrs.data();
    o.n_stop_strings = stop_ptrs.size();
    o.on_token = on_token;
    o.user_data = &stream;

    of_build* build = nullptr;
    of_status st = of_build_open(argv[1], nullptr, &build);
    if (st != OF_OK) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    of_llm* llm = nullptr;
    st = of_llm_open(build, slots, 0, &llm);
    if (st != OF_OK) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    of_generation* g = nullptr;
    if (have_text) st = of_llm_generate_text(llm, prompt_text.data(), prompt_text.size(), &o, &g);
    else
        st = of_llm_generate(llm, ids.data(), ids.size(), &o, &g);
    int rc = 0;
    if (st != OF_OK) {
        std::fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(llm));
        rc = 1;
    } else {
        size_t n = 0;
        const int32_t* toks = of_generation_tokens(g, &n);
        size_t len = 0;
        const char* text = of_generation_text(g, &len);
        nlohmann::json out = {{"tokens", std::vector<int32_t>(toks, toks + n)},
                              {"finish", of_finish_reason_name(of_generation_finish_reason(g))},
                              {"text", std::string(text, len)},
                              {"streamed", stream.events},
                              {"streamed_text", stream.text},
                              {"prompt_tokens", of_generation_prompt_tokens(g)}};
        std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    }
    of_generation_free(g);
    of_llm_close(llm);
    of_build_close(build);
    return rc;
}
