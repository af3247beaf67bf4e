// The image and audio front ends alone (src/image_frontend.cpp, src/audio_frontend.cpp compiled
// in): reads a JSON object from stdin, {"pixels": BLOB, "out": OUT, "cases": [...]}, each case
// {"config": <image_preprocessor.json or audio_frontend.json>, "mode": "image"|"video"|"resize"|
// "audio", "images": [[width, height, byte offset in BLOB, stride], ...], for "resize": "filter",
// "width", "height", for "audio": "samples": [byte offset in BLOB, count] of float32 and "rate",
// for "frames": "n", "fps", "k" (the frames a video of n frames gives, as int64 values)}.
// Appends each case's result to OUT (float32 values; bytes for "resize") and prints a JSON list
// holding, per case, {"shape", "offset", "count"} or {"status", "error"}: the refusal.
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "audio_frontend.hpp"
#include "image_frontend.hpp"
#include "internal.hpp"

int main() {
    using nlohmann::json;
    std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    const json req = json::parse(text);
    std::ifstream blob_in(req.at("pixels").get<std::string>(), std::ios::binary);
    const std::vector<char> blob((std::istreambuf_iterator<char>(blob_in)), std::istreambuf_iterator<char>());
    std::ofstream out(req.at("out").get<std::string>(), std::ios::binary);
    size_t offset = 0;
    json results = json::array();
    for (const json& c : req.at("cases")) {
        try {
            std::vector<omniforge::RgbView> views;
            if (c.at("mode") == "frames") {
                const omniforge::ImageFrontEnd fe = omniforge::ImageFrontEnd::from_config(c.at("config"));
                const std::vector<int64_t> at =
                    omniforge::video_frame_indices(fe, c.at("n").get<int64_t>(), c.at("fps").get<double>(), c.at("k").get<int64_t>());
                out.write(reinterpret_cast<const char*>(at.data()), std::streamsize(at.size() * sizeof(int64_t)));
                results.push_back({{"shape", {at.size()}}, {"offset", offset}, {"count", at.size()}});
                offset += at.size() * sizeof(int64_t);
                continue;
            }
            if (c.at("mode") == "audio") {
                const omniforge::AudioFrontEnd fe = omniforge::AudioFrontEnd::from_config(c.at("config"));
                const size_t at = c.at("samples").at(0).get<size_t>(), count = c.at("samples").at(1).get<size_t>();
                std::vector<float> x(count);
                std::memcpy(x.data(), blob.data() + at, count * sizeof(float));
                std::vector<int64_t> shape;
                std::vector<float> y = omniforge::audio_items(fe, x.data(), x.size(), c.at("rate").get<int64_t>(), shape);
                out.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * sizeof(float)));
                results.push_back({{"shape", shape}, {"offset", offset}, {"count", y.size()}});
                offset += y.size() * sizeof(float);
                continue;
            }
            for (const json& im : c.value("images", json::array())) {
                const size_t at = im.at(2).get<size_t>();
                views.push_back({reinterpret_cast<const uint8_t*>(blob.data() + at), im.at(0).get<int64_t>(), im.at(1).get<int64_t>(),
                                 im.at(3).get<size_t>()});
            }
            const std::string mode = c.at("mode").get<std::string>();
            std::vector<int64_t> shape;
            if (mode == "resize") {
                const int64_t w = c.at("width").get<int64_t>(), h = c.at("height").get<int64_t>();
                std::vector<uint8_t> r = omniforge::pillow_resize(views.at(0), w, h, c.at("filter").get<int>());
                out.write(reinterpret_cast<const char*>(r.data()), std::streamsize(r.size()));
                results.push_back({{"shape", {h, w, 3}}, {"offset", offset}, {"count", r.size()}});
                offset += r.size();
                continue;
            }
            const omniforge::ImageFrontEnd fe = omniforge::ImageFrontEnd::from_config(c.at("config"));
            std::vector<float> x = mode == "video" ? omniforge::video_items(fe, views.data(), views.size(), shape)
                                                   : omniforge::image_item(fe, views.at(0), shape);
            out.write(reinterpret_cast<const char*>(x.data()), std::streamsize(x.size() * sizeof(float)));
            results.push_back({{"shape", shape}, {"offset", offset}, {"count", x.size()}});
            offset += x.size() * sizeof(float);
        } catch (const omniforge::Error& e) {
            results.push_back({{"status", int(e.status)}, {"error", e.what()}});
        }
    }
    std::cout << results.dump() << "\n";
    return 0;
}
