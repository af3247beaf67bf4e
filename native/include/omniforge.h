/*
 * omniforge.h: the C API of libomniforge, the native runtime of an omniforge build folder.
 *
 * Error model: every call returns an of_status; OF_OK is 0. After a failure the handle the call
 * was given (the build for of_build_open and of_llm_open, the LLM for calls on it) holds one
 * sentence saying what went wrong: of_build_last_error / of_llm_last_error (or the of_last_error
 * macro, which picks the right one for either handle). No C++ exception crosses this boundary.
 *
 * Handles: of_build_open always gives a handle unless memory ran out (then *build is NULL and the
 * status is OF_ERR_OUT_OF_MEMORY), even when it fails, so its error can be read; close it with
 * of_build_close. A failed build handle refuses every other call. An of_llm keeps what it needs
 * of its build: the two may be closed in either order.
 *
 * Threads: of_llm_generate* may be called on one of_llm from many threads at once (each request
 * takes its own KV slot); an of_tokenizer may be used by any number of threads. The last error is
 * kept per handle and per calling thread. Opening and closing a handle must not race other calls
 * on it. The library keeps no global state beyond ONNX Runtime's own and a lock around FFTW's planner.
 */
#ifndef OMNIFORGE_H
#define OMNIFORGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define OF_API __attribute__((visibility("default")))
#else
#define OF_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define OMNIFORGE_VERSION_MAJOR 0
#define OMNIFORGE_VERSION_MINOR 4

typedef enum of_status {
    OF_OK = 0,
    OF_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a size or count out of range */
    OF_ERR_MANIFEST = 2,         /* the build folder: manifest, paths, sizes, SHA-256, contracts */
    OF_ERR_ENGINE = 3,           /* ONNX Runtime could not be loaded, or a session failed */
    OF_ERR_INPUT = 4,            /* token ids out of the vocabulary, an empty prompt */
    OF_ERR_CONTEXT_LENGTH = 5,   /* the prompt does not fit the context */
    OF_ERR_OUT_OF_MEMORY = 6,
    OF_ERR_UNSUPPORTED = 7,      /* something valid this library does not run yet */
    OF_ERR_INTERNAL = 8,
    OF_ERR_BUSY = 9              /* every KV slot is in use (see of_generate_options.slot_wait_ms) */
} of_status;

typedef struct of_build of_build;           /* a verified build folder */
typedef struct of_llm of_llm;               /* the LLM stage with its KV-cache pool */
typedef struct of_generation of_generation; /* the result of one generation request */
typedef struct of_tokenizer of_tokenizer;   /* a tokenizer.json */

/* Why a generation ended. */
typedef enum of_finish_reason {
    OF_FINISH_NONE = 0,
    OF_FINISH_STOP = 1,        /* a stop token id was generated (it is the last token) */
    OF_FINISH_STOP_STRING = 2, /* a stop string appeared in the text (the text is cut before it) */
    OF_FINISH_LENGTH = 3,      /* max_new_tokens were generated, or the context is full */
    OF_FINISH_CANCELLED = 4    /* the token callback returned nonzero */
} of_finish_reason;

typedef struct of_build_options {
    /* ONNX Runtime's shared library: the file (libonnxruntime.so.1.x) or the folder of the
       onnxruntime Python package (its capi/ is searched). NULL: the OMNIFORGE_ORT_LIBRARY
       environment variable, read the same way. */
    const char* ort_library;
    /* intra-op threads of each session; 0: one per CPU core */
    int32_t threads;
    /* nonzero: skip the SHA-256 of every artifact at open (sizes and path rules are still
       checked, and each graph is hashed as it is read for a session) */
    int32_t skip_verify;
} of_build_options;

/* Defaults: ort_library NULL, threads 0, skip_verify 0. */
OF_API void of_build_options_init(of_build_options* options);

/* The status's name, e.g. "OF_ERR_MANIFEST" (never NULL). */
OF_API const char* of_status_name(of_status status);

/* Open the build folder at path: reads manifest.json (schema version 2), applies the path rules
   (relative, '/'-separated, no '..', no backslash, no control characters, resolving inside the
   folder, regular files), verifies every artifact's size and SHA-256, and loads ONNX Runtime.
   options may be NULL (the defaults). */
OF_API of_status of_build_open(const char* path, const of_build_options* options, of_build** build);
OF_API void of_build_close(of_build* build); /* NULL is ignored */
OF_API const char* of_build_last_error(const of_build* build); /* "" when none; never NULL */

/* The LLM's geometry as the manifest describes it (any pointer may be NULL). */
OF_API of_status of_build_llm_geometry(of_build* build, int32_t* num_layers, int32_t* hidden_size,
                                int32_t* vocab_size, int32_t* max_context);

/* Open the stage 'llm' (its 'ort_inplace_llm' variant, bound through its contract) with a KV
   pool of num_slots sequences of up to max_context tokens (0: the model's context), and the
   token embeddings of the stage 'token_embedding'. On failure the build's last error says why. */
OF_API of_status of_llm_open(of_build* build, int32_t num_slots, int32_t max_context, of_llm** llm);
OF_API void of_llm_close(of_llm* llm); /* NULL is ignored */
OF_API const char* of_llm_last_error(const of_llm* llm); /* "" when none; never NULL */

/* The prefix cache (off by default): the KV of up to `entries` finished requests stays in their
   slots, so a later request whose prompt starts with the tokens one of them fed (its prompt and
   generated tokens but the last), in whole blocks of block_size tokens and leaving at least one
   token to run, copies that part instead of computing it, as the Python runtime's PrefixCache
   (a conversation's next turn reuses the earlier turns). entries must be below the pool's slot
   count (0: off); an entry keeps its slot until a request needs it (least recently used first).
   Changing block_size drops the entries. of_generation_reused_tokens says what a request reused. */
OF_API of_status of_llm_set_prefix_cache(of_llm* llm, int32_t entries, int32_t block_size);

/* The modality ("image", ...) the token id asks for when it is one of the build's signal tokens,
   else NULL (also for a NULL handle, or a build whose tokenizer cannot be read). Owned by the LLM
   (valid until of_llm_close). A streaming callback can use it on its token_id to see signal
   events as they are generated. */
OF_API const char* of_llm_signal_modality(const of_llm* llm, int32_t token_id);

/* How the LLM looks token embeddings up: "table_fp32" or "table_int8" (the token_embedding
   graph's table read into memory), or "session" (the graph run by ONNX Runtime). */
OF_API const char* of_llm_embedding_form(const of_llm* llm);

/* Greedy generation from token ids: prefill the n_prompt ids, then decode the argmax token until
   max_new_tokens are generated, eos_id is generated (it is included in out_ids; -1: no stop id)
   or the context is full. out_ids must hold out_capacity >= max_new_tokens ids; *out_n receives
   how many were written. */
OF_API of_status of_llm_generate_greedy(of_llm* llm, const int32_t* prompt_ids, size_t n_prompt,
                                 int32_t max_new_tokens, int32_t eos_id, int32_t* out_ids,
                                 size_t out_capacity, size_t* out_n);

/* ---- sampling and streaming ------------------------------------------------------------------ */

/* Called once per generated token, on the thread that called of_llm_generate*, before the next
   token is computed. token_id: the token; text/text_len: the visible UTF-8 text this token adds
   (never a split character: bytes of an incomplete character wait for the next token; special,
   stop, signal and placeholder tokens add none; text_len may be 0; text is not NUL-terminated and
   is valid only during the call). Return 0 to go on, nonzero to stop: the request then ends with
   OF_FINISH_CANCELLED, the token just reported being the last one. It must not throw, and must not
   call into the same request. */
typedef int (*of_token_callback)(void* user_data, int32_t token_id, const char* text, size_t text_len);

typedef struct of_generate_options {
    size_t struct_size;         /* sizeof(of_generate_options): set by of_generate_options_init */
    int32_t max_new_tokens;     /* >= 1; default 64 */
    double temperature;         /* 0 (default): greedy; else in [0.001, 1000] */
    int32_t top_k;              /* keep the k most likely tokens; 0 (default): off */
    double top_p;               /* keep the smallest set whose mass reaches top_p, in (0, 1]; 1: off */
    double repetition_penalty;  /* HF semantics: positive logits of seen tokens divided, negative
                                   multiplied; seen = prompt ids + generated; in [0.001, 1000]; 1: off */
    uint64_t seed;              /* the draws are numpy.random.default_rng(seed)'s, as the Python runtime */
    const int32_t* stop_token_ids; /* n_stop_token_ids ids that end the request (kept in the output) */
    int32_t n_stop_token_ids;   /* -1 (default): the model's EOS (tokenizer_config's eos_token) when
                                   the build carries a tokenizer, else none; 0: none */
    const char* const* stop_strings; /* n_stop_strings NUL-terminated UTF-8 strings; the text is cut
                                   before the first one that appears (needs the build's tokenizer) */
    size_t n_stop_strings;
    of_token_callback on_token; /* NULL: no streaming */
    void* user_data;            /* passed to on_token */
    int32_t slot_wait_ms;       /* when every KV slot is in use: 0 (default) fail at once with
                                   OF_ERR_BUSY, > 0 wait up to that long, -1 wait until one is free */
    int32_t collect_signal_hidden; /* nonzero: keep the final hidden state each generated signal
                                   token hands to its output projector (of_generation_signal_hidden);
                                   0 (default): not kept */
} of_generate_options;

/* Defaults: struct_size set, max_new_tokens 64, greedy, top_k 0, top_p 1, penalty 1, seed 0,
   the model's EOS as the stop id, no stop strings, no callback, slot_wait_ms 0. */
OF_API void of_generate_options_init(of_generate_options* options);

/* Generate from token ids: the prompt is prefilled in one step, then tokens are chosen one by one
   (greedy, or sampled as options say) until a stop token, a stop string, max_new_tokens, a full
   context or a cancelling callback. options may be NULL (the defaults). On OF_OK *result holds the
   tokens, text and finish reason (free it with of_generation_free); on failure *result is NULL and
   of_llm_last_error(llm) says why. Each call takes one KV slot of the LLM's pool for its duration:
   calls on one of_llm from different threads run concurrently, each with its own state. */
OF_API of_status of_llm_generate(of_llm* llm, const int32_t* prompt_ids, size_t n_prompt,
                                 const of_generate_options* options, of_generation** result);

/* As of_llm_generate, from prompt text (prompt_len bytes of UTF-8, not NUL-terminated) encoded
   as the Python runtime's TextTokenizer.encode does it: the build's tokenizer with its special
   tokens, BOS first when tokenizer_config.json's add_bos_token asks for it. Invalid UTF-8 is
   OF_ERR_INPUT; a build whose tokenizer cannot be read gives that tokenizer's sentence. */
OF_API of_status of_llm_generate_text(of_llm* llm, const char* prompt, size_t prompt_len,
                                      const of_generate_options* options, of_generation** result);

/* As of_llm_generate, from n_rows prompt rows (n_rows x hidden_size floats, row-major): the
   embeddings the LLM is fed, e.g. token embeddings with an encoder's projected media rows spliced
   in where the prompt's placeholders were (as the Python runtime's LlmRuntime.prepare lays them
   out). history_ids (n_history ids, may be NULL when 0) are the prompt's token ids the repetition
   penalty counts as seen. Rows with NaN or Inf, or history ids outside the vocabulary, are
   OF_ERR_INPUT. The prefix cache matches rows, not ids: a later turn whose rows start with an
   earlier request's reuses its KV whether those rows came from tokens or media. */
OF_API of_status of_llm_generate_embeddings(of_llm* llm, const float* rows, size_t n_rows, const int32_t* history_ids,
                                            size_t n_history, const of_generate_options* options,
                                            of_generation** result);

/* Teacher forcing, as the Python runtime's LlmRuntime.hidden_after: the final hidden states of
   the n_ids tokens fed after n_rows prompt rows (n_rows x hidden_size floats), n_ids x hidden_size
   floats into hidden (n_floats exactly that), at the positions the build's protocol reads signal
   tokens at ("predicting": the rows that predict each id; "at_token": the rows at them). A cached
   prefix of the rows is reused; nothing is kept; it takes a KV slot, waiting for one. */
OF_API of_status of_llm_hidden_after(of_llm* llm, const float* rows, size_t n_rows, const int32_t* ids, size_t n_ids,
                                     float* hidden, size_t n_floats);

/* The hidden states of `modality`'s whole set of signal tokens ([IMG0..3], ...: n_signal x
   hidden_size floats into hidden, n_floats exactly that), what of_decoder_conditioning takes, for
   a generation made with options.collect_signal_hidden: the rows it collected when it generated
   the whole set in order (the first such run), else the set teacher-forced after the request's
   prompt rows and its generated text (stop tokens left out, cut to fit the context), as the
   Python runtime's Pipeline.run does for a modality forced with force=[...]. The forced pass takes
   a KV slot (waiting for one) and keeps nothing. A modality the build has no signal tokens for is
   OF_ERR_INPUT. */
OF_API of_status of_llm_signal_hidden(of_llm* llm, const of_generation* g, const char* modality, float* hidden,
                                      size_t n_floats);

/* The token embeddings of n ids (what the LLM is fed for them, as the build's token_embedding
   stage computes them): n x hidden_size floats written to rows, n_floats must be exactly that.
   With of_encoder_run's rows spliced in, they make of_llm_generate_embeddings' prompt. Ids outside
   the vocabulary are OF_ERR_INPUT. */
OF_API of_status of_llm_embed_tokens(of_llm* llm, const int32_t* ids, size_t n, float* rows, size_t n_floats);

/* One medium's projected rows for a prompt: n_rows x hidden_size floats (of_encoder_run's). */
typedef struct of_media_rows {
    const char* modality; /* "image", "video" or "audio" */
    const float* rows;
    size_t n_rows;
} of_media_rows;

/* A text prompt (prompt_len bytes of UTF-8) with media, laid out as the Python runtime's
   Pipeline.run lays it out, then generated as of_llm_generate_embeddings: by the build's
   conversation protocol when it has one (NExT-GPT's: "### Human:" and BOS per text segment, each
   medium's rows wrapped in <Img> ... </Img> in the order given, then the prompt and
   "### Assistant:"; the protocol's stop strings when options give none), else the rows spliced in
   at the prompt's placeholders ("<image>", ...: the build's), items of one modality in order, with
   a placeholder put in front of the text for a modality it lacks. n_media may be 0 (text alone,
   laid out the same way). A modality the build takes no placeholder for, more items than
   placeholders, NaN rows or a prompt with its media beyond the context are refused as the Python
   runtime refuses them. */
OF_API of_status of_llm_generate_media(of_llm* llm, const char* prompt, size_t prompt_len, const of_media_rows* media,
                                       size_t n_media, const of_generate_options* options, of_generation** result);

OF_API const int32_t* of_generation_tokens(const of_generation* g, size_t* n); /* generated ids */
/* The visible text, NUL-terminated UTF-8 (special, stop, signal and placeholder tokens left out;
   cut before a stop string); "" when the build has no tokenizer. len may be NULL. */
OF_API const char* of_generation_text(const of_generation* g, size_t* len);
OF_API of_finish_reason of_generation_finish_reason(const of_generation* g);
OF_API size_t of_generation_prompt_tokens(const of_generation* g);
OF_API size_t of_generation_reused_tokens(const of_generation* g); /* from the prefix cache */
OF_API double of_generation_ttft_s(const of_generation* g);   /* request start to the first token */
OF_API double of_generation_decode_s(const of_generation* g); /* the tokens after the first */
OF_API void of_generation_free(of_generation* g);              /* NULL is ignored */

/* The signal tokens the request generated ([IMG0], [VID3], [AUD1], ...: the manifest's
   pipeline.signal_tokens, which the text leaves out), in order, as the Python runtime's
   GenerationResult.signals: event i's modality ("image", "video", "audio": the manifest's key),
   the token as the tokenizer spells it, its id, and its index among of_generation_tokens. Any
   output pointer may be NULL; the strings are NUL-terminated and owned by the generation (valid
   until of_generation_free). An index at or beyond the count, or g NULL, is
   OF_ERR_INVALID_ARGUMENT. A build whose tokenizer cannot be read reports none. */
OF_API size_t of_generation_signal_count(const of_generation* g); /* 0 for NULL */
OF_API of_status of_generation_signal(const of_generation* g, size_t i, const char** modality, const char** token,
                                      int32_t* token_id, size_t* index);

/* The final hidden state (*n = hidden_size floats, owned by the generation) that signal event i
   hands to its modality's output projector, when the request set collect_signal_hidden: the row
   that predicted the token when the build's protocol says signal_position "predicting"
   (NExT-GPT's generation), else the row computed at the token. A signal token generated last
   under "at_token" is fed once more for it, unless it was a stop token or the context is full:
   then, and when the request did not collect, *data is NULL and *n 0. An index at or beyond the
   count is OF_ERR_INVALID_ARGUMENT. */
OF_API of_status of_generation_signal_hidden(const of_generation* g, size_t i, const float** data, size_t* n);

/* "stop", "stop_string", "length", "cancelled" ("" for OF_FINISH_NONE): the Python runtime's words. */
OF_API const char* of_finish_reason_name(of_finish_reason reason);

/* ---- the tokenizer -------------------------------------------------------------------------- */

/* A tokenizer.json of the kinds omniforge builds carry: a BPE model (byte-level, as the embedded
   default's, or SentencePiece-style with byte fallback, as Llama/Vicuna's), added and special
   tokens, the Prepend/Replace normalizers, ByteLevel/Metaspace pre-tokenizers, a template
   post-processor, and the ByteLevel/Metaspace/Replace/ByteFallback/Fuse/Strip decoders. Anything
   else is refused here with one sentence (OF_ERR_UNSUPPORTED). Ids and text equal the `tokenizers`
   library's for the same file. A tokenizer is immutable: any number of threads may use one. Like
   of_build_open, it gives a handle even when it fails (NULL only when memory ran out). */
OF_API of_status of_tokenizer_open(const char* path, of_tokenizer** tokenizer);
/* The build's tokenizer (its manifest's 'tokenizer' file, verified as read); errors go to the build. */
OF_API of_status of_build_tokenizer(of_build* build, of_tokenizer** tokenizer);
OF_API void of_tokenizer_close(of_tokenizer* tokenizer);                   /* NULL is ignored */
OF_API const char* of_tokenizer_last_error(const of_tokenizer* tokenizer); /* "" when none */

/* Encode len bytes of UTF-8 text (invalid UTF-8: OF_ERR_INPUT) as tokenizers' encode(text,
   add_special_tokens).ids. *n_ids receives the number of ids; with ids NULL and capacity 0 nothing
   else is written (a size query); a capacity too small is OF_ERR_INVALID_ARGUMENT. */
OF_API of_status of_tokenizer_encode(of_tokenizer* tokenizer, const char* text, size_t len,
                                     int add_special_tokens, int32_t* ids, size_t capacity, size_t* n_ids);
/* Decode ids as tokenizers' decode(ids, skip_special_tokens): NUL-terminated UTF-8 in text (ids
   outside the vocabulary are left out; bytes that are not UTF-8 become U+FFFD). *len receives the
   length without the NUL; text NULL with capacity 0 is a size query; capacity must exceed *len. */
OF_API of_status of_tokenizer_decode(of_tokenizer* tokenizer, const int32_t* ids, size_t n,
                                     int skip_special_tokens, char* text, size_t capacity, size_t* len);
/* The id of a token (an added token or a vocabulary entry); OF_ERR_INPUT when it has none. */
OF_API of_status of_tokenizer_token_to_id(of_tokenizer* tokenizer, const char* token, int32_t* id);
OF_API size_t of_tokenizer_vocab_size(const of_tokenizer* tokenizer); /* with the added tokens */

/* ---- media in: the encoders and input projectors --------------------------------------------- */

typedef struct of_encoder of_encoder; /* one modality's encoder and its input projector */

/* The encoder of "image", "video" (the image encoder, over a video's frames or clips) or "audio":
   stage image_encoder or audio_encoder, and the input projector its embeddings go through
   ({image|audio}_input_projector when the build has one, else input_projector), each the stage's
   served variant. The front ends stay with the caller: the encoder takes what the Python runtime's
   front end makes of a medium (resized, normalised pixels; ImageBind's 2-frame clips or fbank
   clips; log-mel features), in the shape of_encoder_input_shape gives. A build without the stage is
   OF_ERR_UNSUPPORTED. Errors go to the build's handle; the two handles may be closed in either
   order. */
OF_API of_status of_encoder_open(of_build* build, const char* modality, of_encoder** encoder);
OF_API void of_encoder_close(of_encoder* encoder);                    /* NULL is ignored */
OF_API const char* of_encoder_last_error(const of_encoder* encoder);  /* "" when none; never NULL */
/* The encoder input's name: "pixel_values", "fbank", "input_features" or "log_mel"; "" for NULL. */
OF_API const char* of_encoder_input_name(const of_encoder* encoder);
/* The shape of one item of the encoder's input (batch 1), e.g. 1 3 224 224 for CLIP's pixels,
   1 3 2 224 224 for ImageBind's image clip, 1 1 128 204 for its fbank. Size query as
   of_decoder_latent_shape. */
OF_API of_status of_encoder_input_shape(of_encoder* encoder, int64_t* shape, size_t capacity, size_t* rank);
/* The LLM rows one medium becomes: *n_rows rows (1 for a pooled embedding such as CLIP's or
   ImageBind's, the encoder's tokens for BLIP-2 or Whisper) of *width floats (the LLM's hidden
   size). */
OF_API of_status of_encoder_rows(of_encoder* encoder, size_t* n_rows, size_t* width);
/* The LLM rows of one medium, as the Python runtime's encode_image / encode_video / encode_audio:
   the encoder on `batch` items (n_input = batch x the item's size: one image; a video's frames or
   ImageBind's clips; an audio's fbank clips), its embeddings averaged over the batch, then the input
   projector. rows receives n_rows x width floats (n_floats must be exactly that), to splice into a
   prompt at the medium's placeholder for of_llm_generate_embeddings. NaN or Inf input, or a size
   that does not match, is OF_ERR_INPUT. Calls on one encoder may come from any number of threads. */
OF_API of_status of_encoder_run(of_encoder* encoder, const float* input, size_t n_input, int64_t batch, float* rows,
                                size_t n_floats);

/* An RGB image, 8 bits per channel, as an image or video decoder hands one over: `height` rows
   `stride` bytes apart (0: width x 3), each of `width` pixels of R, G and B bytes. */
typedef struct of_image {
    const uint8_t* pixels;
    int64_t width;
    int64_t height;
    size_t stride;
} of_image;

/* The build's image front end (its image_preprocessor config) on one image, as the Python runtime
   prepares an image for the image encoder: CLIP's preprocessing (the shortest edge resized with the
   configured Pillow filter, center crop, rescale, normalise), BLIP's (resized to the exact size) or
   ImageBind's (a 2-frame clip of the image). Pillow's resampling is reproduced exactly, so the
   result equals the Python runtime's. Writes one item of the encoder's input (n_floats: the size of
   of_encoder_input_shape) to `input`. For "image" and "video" encoders ("audio" is
   OF_ERR_UNSUPPORTED); an image without pixels, of more than 64,000,000 pixels or with sides
   further apart than 100:1 is OF_ERR_INPUT. */
OF_API of_status of_encoder_image_input(of_encoder* encoder, const of_image* image, float* input, size_t n_floats);

/* The LLM rows of an image or a video from pixels: the image front end on each image, then
   of_encoder_run. "image": one image (n_images 1). "video": the frames the caller picked, in order
   (the Python runtime picks the video decoder's frame count, evenly spaced), each prepared as an
   image and their embeddings averaged; for ImageBind builds, clips of frames_per_clip consecutive
   frames (n_images a multiple of it, at most 64 clips), each clip's short side scaled (bilinear)
   and cut into 3 crops, as ImageBind's video transform. */
OF_API of_status of_encoder_run_images(of_encoder* encoder, const of_image* images, size_t n_images, float* rows,
                                       size_t n_floats);

/* Which frames of a decoded video (n_frames frames at fps frames per second) the Python runtime
   encodes, in the order of_encoder_run_images takes them: the video decoder's frame count (4
   without one) evenly spaced, or for ImageBind builds each of its clips' frames_per_clip frames
   (clips of 2 s spread over the video as pytorchvideo 0.1.5 spreads them), clip after clip. For the
   "video" encoder; *n gets the count, and with indices NULL and capacity 0 only the count. */
OF_API of_status of_encoder_video_frames(of_encoder* encoder, int64_t n_frames, double fps, int64_t* indices, size_t capacity,
                                         size_t* n);

/* The build's audio front end (its audio_frontend config) on a recording's mono samples at
   `sample_rate` Hz (1000 to 384000), as the Python runtime prepares a recording for the audio
   encoder: its log-mel features, ImageBind's Kaldi fbank clips (resampled to 16 kHz with
   torchaudio's windowed sinc, clips spread over the recording), Whisper's log-mel over its window
   or CLAP's features (fusion's four channels, or rand_trunc's one). Only the seconds the front end reads are used (the Python runtime reads a file's first
   channel for ImageBind, the mean of its channels otherwise). Writes *batch items of the encoder's
   input (n_floats: *batch x the item's size) to `input`; with `input` NULL and n_floats 0 it only
   sets *batch (the clips of an ImageBind build, else 1). An empty recording, NaN or infinite
   samples are OF_ERR_INPUT. */
OF_API of_status of_encoder_audio_input(of_encoder* encoder, const float* samples, size_t n_samples, int32_t sample_rate,
                                        float* input, size_t n_floats, int64_t* batch);

/* The LLM rows of a recording from its mono samples: the audio front end, then of_encoder_run. */
OF_API of_status of_encoder_run_audio(of_encoder* encoder, const float* samples, size_t n_samples, int32_t sample_rate,
                                      float* rows, size_t n_floats);

/* ---- the diffusion decoders ------------------------------------------------------------------ */

typedef struct of_decoder of_decoder; /* one modality's UNet, VAE decoder (and vocoder) and scheduler */
typedef struct of_media of_media;     /* a decoded image, video or waveform */

typedef struct of_decoder_options {
    size_t struct_size;      /* sizeof(of_decoder_options): set by of_decoder_options_init */
    int32_t steps;           /* denoising steps, >= 1 and at most what the build's scheduler config
                                allows (999 for DDIM over 1000 training timesteps, steps_offset 1);
                                default 20 */
    double guidance_scale;   /* in [0, 1000]; above 1: classifier-free guidance; default 7.5 */
    const char* scheduler;   /* "ddim" (default; NULL too), "euler" or "dpm" (DPM-Solver++ 2M) */
    uint64_t seed;           /* the initial noise when no latents are given (as the Python runtime draws it) */
} of_decoder_options;

/* Defaults: struct_size set, 20 steps, guidance 7.5, "ddim", seed 0 (the Python runtime's
   DiffusionConfig). */
OF_API void of_decoder_options_init(of_decoder_options* options);

/* The decoder of "image", "video" or "audio": its UNet ({modality}_unet), VAE decoder
   ({modality}_vae_decoder) and, for audio, the vocoder, each the stage's served variant in a
   session made as the LLM's; the scheduler, VAE and vocoder configs and the unconditional
   embedding ({modality}_uncond, when the build has one) are read and checked here. A build
   without the stages is OF_ERR_UNSUPPORTED, as is a CogVideoX video decoder (the Python runtime
   runs it). Errors go to the build's handle. The decoder keeps what it needs of the build: the two
   handles may be closed in either order. */
OF_API of_status of_decoder_open(of_build* build, const char* modality, of_decoder** decoder);
OF_API void of_decoder_close(of_decoder* decoder);                    /* NULL is ignored */
OF_API const char* of_decoder_last_error(const of_decoder* decoder);  /* "" when none; never NULL */
OF_API const char* of_decoder_modality(const of_decoder* decoder);    /* "image", "video", "audio" */

/* The shape of the initial latents (batch 1, e.g. 1 4 16 16 for images) and of the conditioning
   (batch 1, e.g. 1 77 32; AudioLDM's class labels 1 16). *rank receives the rank; shape NULL with
   capacity 0 is a size query; a capacity below the rank is OF_ERR_INVALID_ARGUMENT. */
OF_API of_status of_decoder_latent_shape(of_decoder* decoder, int64_t* shape, size_t capacity, size_t* rank);
OF_API of_status of_decoder_conditioning_shape(of_decoder* decoder, int64_t* shape, size_t capacity, size_t* rank);

/* Decode one medium from its conditioning (n_cond floats: the output projector's output, in the
   conditioning shape), as the Python runtime's decode_image / decode_video / decode_audio:
   the scheduler's timesteps, the noise scaled by its initial sigma, per step the UNet on the
   unconditional and conditional inputs batched as 2 (guidance_scale > 1) mixed as
   uncond + guidance_scale * (cond - uncond), the scheduler step, then the VAE decoder on
   latents / scaling_factor (and the vocoder on its mel). uncond: n_cond floats, or NULL for the
   build's unconditional embedding (zeros when it has none). initial_latents: n_latents floats in
   the latent shape (the Python runtime's `latents=`; the result then equals its result), or NULL
   with n_latents 0 for noise drawn from options->seed as the Python runtime draws it
   (numpy.random.default_rng(seed).standard_normal, within 4e-15 before the float32 cast).
   options may be NULL (the defaults). On OF_OK *result holds the medium (free it with
   of_media_free). Calls on one decoder may come from any number of threads;
   each run has its own scheduler state and buffers. */
OF_API of_status of_decoder_run(of_decoder* decoder, const float* cond, size_t n_cond, const float* uncond,
                                const float* initial_latents, size_t n_latents, const of_decoder_options* options,
                                of_media** result);

/* The decoder's conditioning from the hidden states its modality's signal tokens handed on
   (n_hidden floats: the tokens' of_generation_signal_hidden rows in order, n_signal x hidden as
   of_decoder_conditioning_input says), through its output projector ({modality}_output_projector),
   as the Python runtime's Pipeline.conditioning. A projector that also reads the signal tokens'
   input embeddings (NExT-GPT's) takes them from llm, which may be NULL otherwise. cond receives
   n_cond floats (the conditioning shape's size), ready for of_decoder_run. A build without the
   projector is OF_ERR_UNSUPPORTED. */
OF_API of_status of_decoder_conditioning(of_decoder* decoder, of_llm* llm, const float* hidden, size_t n_hidden, float* cond,
                                         size_t n_cond);
/* The output projector's input: *n_signal signal tokens' hidden states of *hidden floats each
   (0 and 0 when the build has no projector for the decoder's modality). */
OF_API of_status of_decoder_conditioning_input(of_decoder* decoder, size_t* n_signal, size_t* hidden);

/* The medium's float32 values, row-major: an image (height, width, channels) and a video
   (frames, height, width, channels) in [0, 1] (what the Python runtime returns before writing PNG
   or GIF), a waveform (samples,) as the vocoder gives it. */
OF_API const float* of_media_data(const of_media* media, size_t* n);
OF_API const int64_t* of_media_shape(const of_media* media, size_t* rank);
OF_API const char* of_media_kind(const of_media* media);       /* "image", "video", "audio" */
OF_API int32_t of_media_sample_rate(const of_media* media);    /* audio: the vocoder's rate; else 0 */
OF_API double of_media_denoise_s(const of_media* media);       /* the denoising loop */
OF_API double of_media_decode_s(const of_media* media);        /* the VAE decoder (and vocoder) */
OF_API void of_media_free(of_media* media);                    /* NULL is ignored */

/* ---- the whole request in one call ------------------------------------------------------------ */

typedef struct of_pipeline of_pipeline; /* a build's LLM, and its encoders and decoders opened on first use */

/* The chain of a build for one-call requests: its LLM opened as of_llm_open(build, num_slots,
   max_context) does, the encoders and decoders when a request first needs them. One pipeline
   serves any number of threads (each request its own KV slot, as of_llm_generate). Errors go to the
   build's handle; the build may be closed before the pipeline. */
OF_API of_status of_pipeline_open(of_build* build, int32_t num_slots, int32_t max_context, of_pipeline** pipeline);
OF_API void of_pipeline_close(of_pipeline* pipeline);                   /* NULL is ignored */
OF_API const char* of_pipeline_last_error(const of_pipeline* pipeline);  /* "" when none; never NULL */

/* A modality's initial noise for its decoder (of_decoder_run's initial_latents). */
typedef struct of_latents {
    const char* modality;
    const float* data;
    size_t n;
} of_latents;

/* One any-to-any request: a prompt and the media it comes with, as raw buffers. */
typedef struct of_request {
    size_t struct_size;          /* sizeof(of_request): set by of_request_init */
    const char* prompt;          /* UTF-8, prompt_len bytes */
    size_t prompt_len;
    const of_image* image;       /* an image's pixels, or NULL */
    const float* audio;          /* a recording's mono samples at audio_rate Hz, or NULL */
    size_t n_audio;
    int32_t audio_rate;
    const of_image* video;       /* a video's picked frames (of_encoder_run_images'), or NULL */
    size_t n_video_frames;
    const float* video_audio;    /* the video's sound track: mono samples at video_audio_rate Hz, or NULL */
    size_t n_video_audio;
    int32_t video_audio_rate;
    const char* force;           /* "image,audio": modalities generated even if the reply does not ask for
                                    them; NULL or "" for none */
    const of_latents* latents;   /* initial noise per modality (else the decoder's seeded noise) */
    size_t n_latents;
} of_request;

OF_API void of_request_init(of_request* request); /* no prompt, no media, nothing forced */

typedef struct of_response of_response;

/* The whole request, as the Python runtime's Pipeline.run(prompt, image=, audio=, video=, force=,
   latents=, adapter="none", video_audio=) makes it: each medium through its front end, encoder and
   input projector (a video's sound track through the audio encoder, its rows fused with the
   frames' as the build's video_audio config says: concatenated by default); the prompt laid out
   with them (the build's protocol, else the placeholders) and generated with `generate` (NULL:
   defaults; on_token streams the reply; the protocol's stop strings when it sets none; the
   generated text capped so that a forced modality's signal tokens still fit); then for each modality the build produces that the reply asks for (with a protocol,
   where the modality's first signal token appears; else any of its signal tokens) or `force`
   names: the signal tokens' hidden states (generated, else teacher-forced after the reply), the
   output projector and the decoder with `decode` (NULL: defaults). A forced modality's decoder
   options are checked before any work. The LLM runs its base model (no LoRA adapter). */
OF_API of_status of_pipeline_run(of_pipeline* pipeline, const of_request* request, const of_generate_options* generate,
                                 const of_decoder_options* decode, of_response** response);

/* The reply: its tokens, text, finish reason and signal events through the of_generation_*
   calls (the pointer lives as long as the response). */
OF_API const of_generation* of_response_generation(const of_response* response);
OF_API size_t of_response_media_count(const of_response* response);
/* Media in the order image, video, audio (those generated); NULL past the count. Lives as long as
   the response; the of_media_* calls read it (do not free it). */
OF_API const of_media* of_response_media(const of_response* response, size_t index);
OF_API void of_response_free(of_response* response); /* NULL is ignored */

#ifdef __cplusplus
} /* extern "C" */

inline const char* of_last_error(const of_build* h) { return of_build_last_error(h); }
inline const char* of_last_error(const of_llm* h) { return of_llm_last_error(h); }
inline const char* of_last_error(const of_tokenizer* h) { return of_tokenizer_last_error(h); }
inline const char* of_last_error(const of_decoder* h) { return of_decoder_last_error(h); }
inline const char* of_last_error(const of_encoder* h) { return of_encoder_last_error(h); }
inline const char* of_last_error(const of_pipeline* h) { return of_pipeline_last_error(h); }
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define of_last_error(h)                                                                       \
    _Generic((h), of_build*: of_build_last_error, const of_build*: of_build_last_error,        \
             of_llm*: of_llm_last_error, const of_llm*: of_llm_last_error,                      \
             of_tokenizer*: of_tokenizer_last_error, const of_tokenizer*: of_tokenizer_last_error,  \
             of_decoder*: of_decoder_last_error, const of_decoder*: of_decoder_last_error,      \
             of_encoder*: of_encoder_last_error, const of_encoder*: of_encoder_last_error,      \
             of_pipeline*: of_pipeline_last_error, const of_pipeline*: of_pipeline_last_error)(h)
#endif

#endif /* OMNIFORGE_H */
