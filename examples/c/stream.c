/* Stream a reply to a text prompt through libomniforge's C API.
 *
 *   stream BUILD "PROMPT" [MAX_NEW_TOKENS]
 *
 * Opens the build folder (verifying every artifact), opens its LLM with one KV slot, and prints the
 * reply's text to stdout as it is generated, then one line on stderr with the finish reason and
 * the token count. ONNX Runtime's library comes from OMNIFORGE_ORT_LIBRARY (the library file, or
 * the onnxruntime Python package's folder). Build: see docs/native.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "omniforge.h"

/* Called once per generated token: print the text it adds (never a split UTF-8 character). */
static int print_piece(void* user_data, int32_t token_id, const char* text, size_t text_len) {
    (void)user_data;
    (void)token_id;
    fwrite(text, 1, text_len, stdout);
    fflush(stdout);
    return 0; /* nonzero would stop the request here */
}

int main(int argc, char** argv) {
    of_build* build = NULL;
    of_llm* llm = NULL;
    of_generation* result = NULL;
    of_generate_options options;
    of_status st;
    size_t n_tokens = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: %s BUILD \"PROMPT\" [MAX_NEW_TOKENS]\n", argv[0]);
        return 2;
    }
    st = of_build_open(argv[1], NULL, &build);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    st = of_llm_open(build, /*num_slots=*/1, /*max_context=*/0, &llm);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    of_generate_options_init(&options); /* greedy, the model's EOS as the stop token */
    if (argc > 3) options.max_new_tokens = atoi(argv[3]);
    options.on_token = print_piece;

    st = of_llm_generate_text(llm, argv[2], strlen(argv[2]), &options, &result);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(llm));
    } else {
        of_generation_tokens(result, &n_tokens);
        printf("\n");
        fprintf(stderr, "finish: %s, %u tokens\n", of_finish_reason_name(of_generation_finish_reason(result)),
                (unsigned)n_tokens);
    }
    of_generation_free(result);
    of_llm_close(llm);
    of_build_close(build);
    return st == OF_OK ? 0 : 1;
}
