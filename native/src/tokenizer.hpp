// tokenizer.json read in C++ for the tokenizers omniforge builds carry: byte-level BPE (the
// embedded default's, GPT-2 style; Qwen2/2.5/3's, with NFC and Qwen2's Split regex) and
// SentencePiece-style BPE with byte fallback (Llama/Vicuna, as `omniforge import nextgpt` writes
// it), with added and special tokens. Encoding and decoding give
// what the `tokenizers` library gives for the same file; anything else is refused at load with one
// sentence.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "internal.hpp"

namespace omniforge {

class Tokenizer {
  public:
    // tokenizer.json's text; `name` names the file in errors. Throws OF_ERR_UNSUPPORTED for a
    // feature this reader does not implement, OF_ERR_MANIFEST for a file that is not a tokenizer.
    static std::unique_ptr<Tokenizer> from_json(const std::string& text, const std::string& name);
    ~Tokenizer();

    // As tokenizers' Tokenizer.encode(text, add_special_tokens).ids; text must be valid UTF-8
    // (else OF_ERR_INPUT).
    std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const;
    // As tokenizers' Tokenizer.decode(ids, skip_special_tokens): unknown ids are left out, invalid
    // UTF-8 becomes U+FFFD as the decoders make it.
    std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const;
    std::optional<int32_t> token_to_id(const std::string& token) const;
    std::optional<std::string> id_to_token(int32_t id) const;
    bool is_special(int32_t id) const;
    size_t vocab_size() const;      // with the added tokens (tokenizers' get_vocab_size(True))
    size_t max_token_chars() const;  // the most characters one vocabulary entry holds

    struct Impl;

  private:
    explicit Tokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

// The number of code points of valid UTF-8 text, or the byte offset of the first invalid sequence
// as a negative number minus one.
int64_t utf8_length(const std::string& s);

// Decoded text made visible token by token without splitting a character (the Python runtime's
// streaming rule): each step decodes the visible ids so far, cuts it before any stop string, and
// hands out what was not handed out yet unless the text ends in U+FFFD (an incomplete character,
// kept until the next token or the end).
class TextStream {
  public:
    TextStream(const Tokenizer& tok, std::vector<int32_t> hidden_ids, std::vector<std::string> stop_strings);
    // Adds a token; returns the new visible text (maybe empty). *stopped: a stop string appeared.
    std::string push(int32_t token, bool finishing, bool* stopped);
    // The text of all `tokens` at once (no stop strings): what push would end with.
    void finish(const std::vector<int32_t>& tokens);
    const std::string& text() const { return text_; }

  private:
    const Tokenizer& tok_;
    std::vector<int32_t> hidden_, visible_;
    std::vector<std::string> stops_;
    std::string text_;
    size_t emitted_ = 0;
};

}  // namespace omniforge

namespace omniforge {

// A build's tokenizer with what tokenizer_config.json says of BOS and EOS.
struct BuildTokenizer {
    std::shared_ptr<const Tokenizer> tok;
    std::optional<int32_t> eos, bos;
    bool add_bos = false;
};

// The build's files 'tokenizer' (and 'tokenizer_config' when listed), verified as they are read.
// Throws OF_ERR_UNSUPPORTED when the build lists no tokenizer or uses a feature not implemented.
BuildTokenizer load_build_tokenizer(const BuildImpl& b);

// The Python runtime's TextTokenizer.encode: valid UTF-8, a text too long for max_tokens however
// it is split refused before it is tokenized (max_tokens < 0: no limit), ids with the special
// tokens when `special`, and BOS first when tokenizer_config asks for it and it is missing.
std::vector<int32_t> encode_text(const BuildTokenizer& t, const std::string& text, int64_t max_tokens, bool special);

}  // namespace omniforge
