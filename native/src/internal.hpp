// libomniforge internals: the manifest reader, ONNX Runtime loading and the LLM runtime.
// Everything here may throw; only api.cpp talks to C callers, and it catches everything.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <chrono>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "omniforge.h"
#include "pairwise_sum.hpp"

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
    std::vector<std::pair<std::string, std::string>> signal_tokens;  // (modality, token)
    std::vector<std::pair<std::string, std::string>> placeholders;   // (modality, token)

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
// One artifact's size and SHA-256, read in chunks (for files too large to hold, such as external data).
void verify_artifact(const std::string& folder, const Manifest& m, const std::string& rel);
// Build-relative paths of the external-data files the serialized graph at rel reads (external_data.cpp).
std::vector<std::string> external_data_refs(const std::vector<char>& graph, const std::string& rel);
// An artifact's bytes, hashed as read: what is returned is what the manifest vouches for.
std::vector<char> read_verified(const std::string& folder, const Manifest& m, const std::string& rel);
std::string sha256_hex(const void* data, size_t n);

// The token-embedding table: rows (V, H) as floats (INT8 codes stored as their float values) and,
// for the INT8 form, one scale per row: a row is rows[id] * scale[id], in float32.
struct EmbeddingTable {
    std::vector<float> rows;    // the FP32 table (empty for the INT8 form)
    std::vector<int8_t> codes;  // the INT8 form's codes, one byte per value as the graph stores them
    std::vector<float> scale;   // the INT8 form's per-row scale; empty: FP32 table
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
    bool verified = false;  // every artifact's SHA-256 was checked at open
    std::shared_ptr<OrtLibrary> ort;
    ~BuildImpl();
};

std::unique_ptr<BuildImpl> open_build(const std::string& folder, const of_build_options& options);

// ---- sampling (sampling.cpp) -------------------------------------------------------------------

constexpr double kMinTemperature = 1e-3, kMaxTemperature = 1e3;  // as sampling.py
constexpr double kMinPenalty = 1e-3, kMaxPenalty = 1e3;

struct SamplingConfig {
    double temperature = 0.0;  // 0: greedy
    int64_t top_k = 0;         // 0: off
    double top_p = 1.0;        // 1: off
    double repetition_penalty = 1.0;
    uint64_t seed = 0;
};
// Throws OF_ERR_INVALID_ARGUMENT with GenerationConfig's sentences.
void check_sampling(const SamplingConfig& c);

// numpy.random.default_rng(seed): SeedSequence then PCG64, bit for bit.
class Rng {
  public:
    explicit Rng(uint64_t seed);
    uint64_t next64();
    double next_double();  // Generator.random()
    double standard_normal();  // Generator.standard_normal(): numpy's ziggurat (sampling.cpp)

  private:
    unsigned __int128 state_ = 0, inc_ = 0;
};


// select_token of sampling.py; keeps its scratch buffers between calls (one per request).
struct Sampler {
    int32_t select(const float* logits, size_t n, const SamplingConfig& c, Rng& rng, const std::vector<int32_t>& history);
    std::vector<float> penalized;
    std::vector<double> z, probs, cdf;
    std::vector<int32_t> order;
    std::vector<uint8_t> seen;
};

// ---- the tokenizer (tokenizer.cpp) ----------------------------------------------------------------

class Tokenizer;        // tokenizer.json read in C++; see tokenizer.hpp
struct BuildTokenizer;  // a build's tokenizer with its BOS/EOS settings

// ---- the LLM ----------------------------------------------------------------------------------

struct LlmImpl;
// The caller owns the result and frees it with close_llm.
LlmImpl* open_llm(std::shared_ptr<BuildImpl> build, int32_t num_slots, int32_t max_context);
// The LLM's row width (hidden_size) and the context its pool holds.
void llm_geometry(const LlmImpl& llm, int32_t* hidden_size, int32_t* max_context);
void close_llm(LlmImpl* llm);
const char* embedding_form(const LlmImpl& llm);  // "table_fp32", "table_int8" or "session"
const BuildTokenizer* llm_tokenizer(const LlmImpl& llm);  // null when the build's cannot be read
of_status llm_tokenizer_error(const LlmImpl& llm, std::string* why);     // why not (OF_OK: it can)
// The modality a signal token asks for ("image", ...), or null when the id is not a signal token
// (or the build's tokenizer cannot be read). The string lives as long as the LLM.
const char* signal_modality(const LlmImpl& llm, int32_t token_id);

// The build's conversation protocol (protocol.json; PromptProtocol): how a prompt with media is
// laid out, where generation stops, which hidden state a signal token hands on.
constexpr size_t kMaxProtocolText = 256;  // characters of one template string
struct Protocol {
    std::string user_prefix = "### Human: ", assistant_prefix = "\n### Assistant:", media_open = "<Img>", media_close = "</Img>";
    bool bos_per_text_segment = true;
    std::vector<std::string> stop_strings{"###"};
    bool predicting = true;  // signal_position "predicting" (else "at_token")
};

// One medium's projected rows (n_rows x hidden_size floats) for a prompt.
struct MediaItem {
    std::string modality;
    const float* rows = nullptr;
    size_t n_rows = 0;
};

// A prompt's rows (n x hidden_size floats), the token ids among them, and the protocol's stop
// strings (empty without a protocol).
struct PreparedPrompt {
    std::vector<float> rows;
    size_t n = 0;
    std::vector<int32_t> ids;
    std::vector<std::string> stop_strings;
};

struct GenerateParams {
    int32_t max_new_tokens = 64;
    SamplingConfig sampling;
    bool default_stop = true;  // the model's EOS (when the build has a tokenizer); else stop_ids
    std::vector<int32_t> stop_ids;
    std::vector<std::string> stop_strings;
    of_token_callback callback = nullptr;
    void* user_data = nullptr;
    int32_t slot_wait_ms = 0;  // 0: fail at once when no KV slot is free; < 0: wait for one
    bool collect_signal_hidden = false;  // keep the hidden state each signal token hands on
};

// A generated signal token, as the Python runtime's SignalEvent: the modality it asks for, the
// token as the tokenizer spells it, its id, and its index among the generated tokens.
struct SignalEvent {
    std::string modality, token;
    int32_t token_id = 0;
    size_t index = 0;
};

struct GenerateOutput {
    std::vector<int32_t> tokens;
    std::vector<SignalEvent> signals;  // the signal tokens among `tokens`, in order
    // per signal event (when collected): the final hidden state the build's protocol reads for it
    // (the row that predicted it, or the row computed at it); empty when there is none (a signal
    // token generated last under 'at_token', with no room or a stop after it)
    std::vector<std::vector<float>> signal_hidden;
    std::string text;  // the visible text (special, stop, signal and placeholder tokens left out)
    of_finish_reason finish = OF_FINISH_NONE;
    size_t prompt_tokens = 0;
    size_t reused_tokens = 0;  // prompt tokens whose KV came from the prefix cache
    double ttft_s = 0.0, decode_s = 0.0;
    // kept when collect_signal_hidden is set, for signal_hidden's teacher-forced pass
    std::vector<float> prompt_rows;
    std::vector<int32_t> stop_ids;
};

GenerateOutput generate(LlmImpl& llm, const std::vector<int32_t>& prompt, const GenerateParams& params);
// The same from `n` prompt rows (n x hidden_size floats: token embeddings with media rows spliced
// in, as LlmRuntime.prepare makes them); `history`: the prompt's token ids for the repetition
// penalty. The prefix cache matches rows, so token and media prompts reuse alike.
GenerateOutput generate_rows(LlmImpl& llm, const std::vector<float>& rows, size_t n, const std::vector<int32_t>& history,
                             const GenerateParams& params,
                             std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now());
// The token embeddings of `ids` (ids.size() x hidden_size floats); ids outside the vocabulary
// are OF_ERR_INPUT.
std::vector<float> embed_tokens(LlmImpl& llm, const std::vector<int32_t>& ids);
// The ids of `modality`'s signal tokens in the manifest's order (LlmRuntime's signal ids):
// OF_ERR_INPUT when the build has none, or its tokenizer lacks one.
std::vector<int32_t> signal_token_ids(const LlmImpl& llm, const std::string& modality);
// A text prompt with media rows as Pipeline.run lays it out: by the build's protocol (NExT-GPT's:
// BOS per text segment, each item wrapped in <Img>...</Img>, LlmRuntime.prepare_protocol), else
// the rows spliced in at the placeholders (a missing placeholder put in front of the text, as
// Pipeline.run does; LlmRuntime.prepare). Checked against the context before any row is computed.
PreparedPrompt prepare_prompt(LlmImpl& llm, std::string text, const std::vector<MediaItem>& items);
// LlmRuntime.hidden_after: the final hidden states (ids.size() x hidden_size) of `ids` fed after
// `n` rows (teacher forcing; a cached prefix is reused, nothing is kept), at the positions the
// protocol reads ('predicting': the rows that predict each id).
std::vector<float> hidden_after(LlmImpl& llm, const std::vector<float>& rows, size_t n, const std::vector<int32_t>& ids,
                                int32_t slot_wait_ms);
// The hidden states of `modality`'s full set of signal tokens for a generation: those it collected
// when it generated the set in order, else teacher-forced after its prompt and generated text, as
// Pipeline.run does for a forced modality.
std::vector<float> signal_hidden(LlmImpl& llm, const GenerateOutput& g, const std::string& modality, int32_t slot_wait_ms);
// Keep the KV of up to `entries` finished requests (0: off) for prompts that start with them, in
// whole blocks of `block_size` tokens (as the Python runtime's PrefixCache); entries < slots.
void set_prefix_cache(LlmImpl& llm, int32_t entries, int32_t block_size);
// The prompt text as the Python runtime's TextTokenizer.encode makes it (BOS rule included).
std::vector<int32_t> encode_prompt(LlmImpl& llm, const std::string& text);
// Whether the build has a conversation protocol (protocol.json; NExT-GPT's).
bool has_protocol(const LlmImpl& llm);
// Greedy decode; returns the generated ids.
std::vector<int32_t> generate_greedy(LlmImpl& llm, const int32_t* ids, size_t n, int32_t max_new_tokens,
                                     int32_t eos_id);

// ---- the encoders and input projectors (encoder.cpp) -------------------------------------------

struct EncoderImpl;  // one modality's encoder and the input projector its embeddings go through

std::shared_ptr<EncoderImpl> open_encoder(std::shared_ptr<BuildImpl> build, const std::string& modality);
const std::string& encoder_modality(const EncoderImpl& e);
const std::string& encoder_input_name(const EncoderImpl& e);
const std::vector<int64_t>& encoder_input_shape(const EncoderImpl& e);  // one item (batch 1)
void encoder_rows(const EncoderImpl& e, size_t* n_rows, size_t* width);  // rows per medium, hidden size
// The LLM rows of one medium from `batch` items of the encoder's input: the encoder, the mean of
// its embeddings over the batch, the input projector; writes n_rows x width floats to rows.
void encode(EncoderImpl& e, const float* input, size_t n_input, int64_t batch, float* rows, size_t n_rows);
struct RgbView;  // image_frontend.hpp
// The build's image front end on one RGB image: one item of the encoder's input (n_input floats).
void image_input(EncoderImpl& e, const RgbView& image, float* input, size_t n_input);
// The LLM rows of an image (n 1) or of a video's picked frames, from their pixels.
void encode_images(EncoderImpl& e, const RgbView* images, size_t n, float* rows, size_t n_rows);
// The frames of a decoded video (n_frames at fps) the Python runtime encodes, in order.
std::vector<int64_t> video_frames(const EncoderImpl& e, int64_t n_frames, double fps);
// The build's audio front end on mono samples: the encoder's batch (*batch items; input NULL and
// n_input 0 only set *batch), and the LLM rows of the recording.
void audio_input(EncoderImpl& e, const float* samples, size_t n, int32_t sample_rate, float* input, size_t n_input, int64_t* batch);
void encode_audio(EncoderImpl& e, const float* samples, size_t n, int32_t sample_rate, float* rows, size_t n_rows);

// ---- the diffusion decoders (decoder.cpp) -----------------------------------------------------

struct DecoderImpl;  // one modality's UNet, VAE decoder (and vocoder), scheduler config, shapes

struct DecodeParams {
    int32_t steps = 20;
    double guidance_scale = 7.5;  // > 1: classifier-free guidance
    std::string scheduler = "ddim";
    uint64_t seed = 0;            // the noise when no initial latents are given
};

struct MediaOut {
    std::string kind;            // image | video | audio
    std::vector<float> data;     // image (H, W, C) and video (F, H, W, C) in [0, 1]; audio (samples,)
    std::vector<int64_t> shape;
    int32_t sample_rate = 0;     // audio: the vocoder's rate
    double denoise_s = 0.0, decode_s = 0.0;
};

std::shared_ptr<DecoderImpl> open_decoder(std::shared_ptr<BuildImpl> build, const std::string& modality);
const std::string& decoder_modality(const DecoderImpl& d);
const std::vector<int64_t>& decoder_latent_shape(const DecoderImpl& d);        // batch 1
const std::vector<int64_t>& decoder_conditioning_shape(const DecoderImpl& d);  // batch 1
// The Python runtime's decode_<modality>(cond, DiffusionConfig, latents): denoising with
// classifier-free guidance, then the VAE decoder (and the vocoder). uncond: null for the build's
// unconditional embedding or zeros; latents: null for the seed's noise (Pipeline.initial_latents').
// Pipeline.conditioning: the output projector on the signal tokens' hidden states (and, for a
// projector that reads them, their input embeddings from `llm`); writes n_cond floats.
void conditioning(DecoderImpl& d, LlmImpl* llm, const float* hidden, size_t n_hidden, float* cond, size_t n_cond);
// The output projector's (signal tokens, hidden width); (0, 0) when the build has none.
std::pair<size_t, size_t> conditioning_input(const DecoderImpl& d);
MediaOut decode(DecoderImpl& d, const float* cond, size_t n_cond, const float* uncond, const float* latents, size_t n_latents,
                const DecodeParams& p);
// decode's checks of the parameters alone (Pipeline.check_steps): before any work is done.
void check_decode(const DecoderImpl& d, const DecodeParams& p);

}  // namespace omniforge
