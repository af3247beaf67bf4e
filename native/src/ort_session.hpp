// How libomniforge opens a stage's graph (runtime.cpp): one way for the LLM and the decoders.
// Includes ONNX Runtime's C++ API with manual initialisation (the library is dlopen'ed).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime/onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <vector>

#include "internal.hpp"

namespace omniforge {

// A variant's graph, verified as it is read; its external-data files must be among the
// variant's listed ones (and are verified when the open skipped the hashes).
std::vector<char> read_graph(const BuildImpl& b, const Variant& v);
// The session every stage runs under: the build's intra-op threads, one inter-op thread, every
// graph optimisation; spin=false stops the worker threads spinning after each run.
Ort::Session open_session(const BuildImpl& b, const Variant& v, const std::vector<char>& data, bool spin);
// The graph's inputs and outputs are the contract's (names in order, dtypes, ranks, static sizes).
void check_graph_io(Ort::Session& session, const Contract& c, const std::string& what, const std::string& file);

}  // namespace omniforge
