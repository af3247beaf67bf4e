// libomniforge internals: the manifest reader, ONNX Runtime loading and the LLM runtime.
// Everything here may throw; only api.cpp talks to C callers, and it catches everything.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "omniforge.h"

namespace omniforge {

// An error a caller can cause: a status and one sentence.
struct Error : std::runtime_error {
    of_status status;
    Error(of_status s, const std::string& message) : std::runtime_error(message), status(s) {}
};

[[noreturn]] inline void fail(of_status s, const std::string& message) { throw Error(s, message); }

// ---- the manifest ---------------------------------------------------------------------------

struct TensorSpec {
    std::string name;
    std::string dtype;           // float32, int64, ...
    std::vector<int64_t> shape;  // static sizes; -1 for a named (dynamic) dim
};

struct Contract {
    std::vector<TensorSpec> inputs, outputs;
    std::vector<std::pair<std::string, std::string>> inplace;  // past input -> present output
    std::map<std::string, std::string> slots;                 // purpose -> tensor name
    std::string slot(const std::string& purpose) const;
};

struct Variant {
    std::string role, file, precision;
    std::vector<std::string> data_files;
    bool stage_contract = true;  // "contract": "stage"
    Contract contract;           // when !stage_contract
};

struct LlmGeometry {
    int64_t num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, hidden_size = 0,
            vocab_size = 0, max_context = 0;
};

struct StageSpec {
    std::string name, kind;
    Contract io;  // inputs and outputs only
    bool has_llm = false;
    LlmGeometry llm;
};

struct StageBuild {
    std::vector<Variant> variants;
    const Variant* find(const std::string& role) const;
};

struct Artifact {
    std::string path, sha256;
    uint64_t size = 0;
};

struct Manifest {
    std::map<std::string, StageSpec> pipeline;  // the pipeline's stage descriptions
    std::map<std::string, StageBuild> stages;
    std::map<std::string, Artifact> artifacts;
    std::map<std::string, std::string> files;

    const StageBuild& stage(const std::string& name) const;
    const StageSpec& spec(const std::string& name) const;
    const Variant& variant(const std::string& stage, const std::string& role) const;
    // The variant ONNX Runtime serves under the stage's own contract: 'ort', else 'canonical'.
    const Variant& served(const std::string& stage) const;
    const Contract& contract(const std::string& stage, const Variant& v) const;
};

// The folder's manifest.json, parsed and checked (schema version 2, path rules, listed files).
Manifest read_manifest(const std::string& folder);
// The path rules on one manifest path (relative, '/'-separated, no '..', backslash or control
// characters); throws OF_ERR_MANIFEST.
void check_relative(const std::string& rel);
// folder/rel after checking it resolves inside folder and is a regular file.
std::string checked_path(const std::string& root_real, const std::string& folder, const std::string& rel);
// Every artifact's size and (unless sizes_only) SHA-256.
void verify_artifacts(const std::string& folder, const Manifest& m, bool sizes_only);
// An artifact's bytes, hashed as read: what is returned is what the manifest vouches for.
std::vector<char> read_verified(const std::string& folder, const Manifest& m, const std::string& rel);
std::string sha256_hex(const void* data, size_t n);

// The token-embedding table: rows (V, H) as floats (INT8 codes stored as their float values) and,
// for the INT8 form, one scale per row: a row is rows[id] * scale[id], in float32.
struct EmbeddingTable {
    std::vector<float> rows;
    std::vector<float> scale;  // empty: FP32 table
};
// The table of a serialized token-embedding graph of one of the two forms omniforge writes;
// false for any other form (the caller runs the graph as a session).
bool read_embedding_table(const std::vector<char>& graph, int64_t vocab, int64_t hidden, EmbeddingTable& table);

// ---- ONNX Runtime and the build ---------------------------------------------------------------

struct OrtLibrary;  // the dlopen'ed library, its API initialised

struct BuildImpl {
    std::string folder;
    Manifest manifest;
    int32_t threads = 0;
    std::shared_ptr<OrtLibrary> ort;
    ~BuildImpl();
};

std::unique_ptr<BuildImpl> open_build(const std::string& folder, const of_build_options& options);

struct LlmImpl;
// The caller owns the result and frees it with close_llm.
LlmImpl* open_llm(std::shared_ptr<BuildImpl> build, int32_t num_slots, int32_t max_context);
void close_llm(LlmImpl* llm);
const char* embedding_form(const LlmImpl& llm);  // "table_fp32", "table_int8" or "session"
// Greedy decode; returns the generated ids.
std::vector<int32_t> generate_greedy(LlmImpl& llm, const int32_t* ids, size_t n, int32_t max_new_tokens,
                                     int32_t eos_id);

}  // namespace omniforge
