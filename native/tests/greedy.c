/* Greedy generation through the C API from C: greedy BUILD MAX_NEW_TOKENS ID...
   Prints the generated ids on one line. ONNX Runtime's library is read from OMNIFORGE_ORT_LIBRARY. */
#include <stdio.h>
#include <stdlib.h>

#include "omniforge.h"

int main(int argc, char** argv) {
    of_build* build = NULL;
    of_llm* llm = NULL;
    of_status st;
    int32_t* prompt;
    int32_t* out;
    int max_new, i, n_prompt;
    size_t n = 0;
    if (argc < 4) {
        fprintf(stderr, "usage: %s BUILD MAX_NEW_TOKENS ID...\n", argv[0]);
        return 2;
    }
    max_new = atoi(argv[2]);
    n_prompt = argc - 3;
    prompt = malloc(sizeof(int32_t) * (size_t)n_prompt);
    out = malloc(sizeof(int32_t) * (size_t)(max_new > 0 ? max_new : 1));
    if (!prompt || !out) return 3;
    for (i = 0; i < n_prompt; ++i) prompt[i] = (int32_t)atoi(argv[3 + i]);

    st = of_build_open(argv[1], NULL, &build);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    st = of_llm_open(build, 1, 0, &llm);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(build));
        of_build_close(build);
        return 1;
    }
    fprintf(stderr, "embedding: %s\n", of_llm_embedding_form(llm));
    st = of_llm_generate_greedy(llm, prompt, (size_t)n_prompt, max_new, -1, out, (size_t)max_new, &n);
    if (st != OF_OK) {
        fprintf(stderr, "%s: %s\n", of_status_name(st), of_last_error(llm));
    } else {
        for (i = 0; i < (int)n; ++i) printf(i ? " %d" : "%d", (int)out[i]);
        printf("\n");
    }
    of_llm_close(llm);
    of_build_close(build);
    free(prompt);
    free(out);
    return st == OF_OK ? 0 : 1;
}
