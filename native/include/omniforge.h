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
 * Threads: a handle is used by one thread at a time (the library keeps no global state beyond
 * ONNX Runtime's own; different handles may be used by different threads).
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
#define OMNIFORGE_VERSION_MINOR 1

typedef enum of_status {
    OF_OK = 0,
    OF_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a size or count out of range */
    OF_ERR_MANIFEST = 2,         /* the build folder: manifest, paths, sizes, SHA-256, contracts */
    OF_ERR_ENGINE = 3,           /* ONNX Runtime could not be loaded, or a session failed */
    OF_ERR_INPUT = 4,            /* token ids out of the vocabulary, an empty prompt */
    OF_ERR_CONTEXT_LENGTH = 5,   /* the prompt does not fit the context */
    OF_ERR_OUT_OF_MEMORY = 6,
    OF_ERR_UNSUPPORTED = 7,      /* something valid this library does not run yet */
    OF_ERR_INTERNAL = 8
} of_status;

typedef struct of_build of_build; /* a verified build folder */
typedef struct of_llm of_llm;     /* the LLM stage with its KV-cache pool */

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

#ifdef __cplusplus
} /* extern "C" */

inline const char* of_last_error(const of_build* h) { return of_build_last_error(h); }
inline const char* of_last_error(const of_llm* h) { return of_llm_last_error(h); }
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define of_last_error(h)                                                                       \
    _Generic((h), of_build*: of_build_last_error, const of_build*: of_build_last_error,        \
             of_llm*: of_llm_last_error, const of_llm*: of_llm_last_error)(h)
#endif

#endif /* OMNIFORGE_H */
