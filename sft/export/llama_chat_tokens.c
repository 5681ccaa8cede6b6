// llama-chat-tokens MODEL.gguf < conversations: the token ids llama.cpp gives each conversation's chat prompt.
//
// The chat template is the GGUF's own (llama_model_chat_template), applied by llama_chat_apply_template, llama.cpp's
// built-in template detector and renderer (not the Jinja engine of llama-cli/llama-server --jinja), with the
// assistant's prompt added; the text is tokenized by llama_tokenize with special tokens parsed and a BOS added when
// the vocabulary says so, as llama-tokenize does. Only the vocabulary is loaded.
// stdin: NUL-terminated fields role, content, role, content, ...; an empty role ends a conversation.
// stdout: one line per conversation, its token ids separated by spaces. Exit 1 with one line on stderr when the
// template is not one llama_chat_apply_template knows. Built by `make llama-cpp` against its libllama.
#include "llama.h"

#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) level, (void) text, (void) data;
}

static char * read_all(FILE * file, size_t * size) {
    size_t capacity = 1 << 16;
    char * data = malloc(capacity);
    *size = 0;
    for (size_t n; (n = fread(data + *size, 1, capacity - *size, file)) > 0;) {
        *size += n;
        if (*size == capacity) {
            data = realloc(data, capacity *= 2);
        }
    }
    data = realloc(data, *size + 1);
    data[*size] = '\0';  // a last field without its NUL still ends
    return data;
}

static int print_prompt_tokens(const struct llama_vocab * vocab, const char * tmpl,
                               const struct llama_chat_message * messages, size_t n_messages) {
    int32_t length = llama_chat_apply_template(tmpl, messages, n_messages, true, NULL, 0);
    if (length < 0) {
        fprintf(stderr, "error: llama_chat_apply_template does not know this model's chat template\n");
        return 1;
    }
    char * text = calloc(length + 1, 1);
    llama_chat_apply_template(tmpl, messages, n_messages, true, text, length + 1);
    int32_t n_tokens = -llama_tokenize(vocab, text, length, NULL, 0, true, true);
    llama_token * tokens = malloc(sizeof(llama_token) * (n_tokens + 1));
    n_tokens = llama_tokenize(vocab, text, length, tokens, n_tokens + 1, true, true);
    for (int32_t i = 0; i < n_tokens; i++) {
        printf(i ? " %d" : "%d", tokens[i]);
    }
    printf("\n");
    free(tokens);
    free(text);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf < conversations\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params params = llama_model_default_params();
    params.vocab_only = true;
    struct llama_model * model = llama_model_load_from_file(argv[1], params);
    if (model == NULL) {
        fprintf(stderr, "error: llama.cpp cannot load %s\n", argv[1]);
        return 1;
    }
    const char * tmpl = llama_model_chat_template(model, NULL);
    if (tmpl == NULL) {
        fprintf(stderr, "error: %s has no chat template\n", argv[1]);
        return 1;
    }
    size_t size;
    char * input = read_all(stdin, &size);
    struct llama_chat_message * messages = malloc(sizeof(*messages) * (size / 2 + 1));
    size_t n_messages = 0;
    for (char * field = input; field < input + size;) {
        char * role = field;
        field += strlen(role) + 1;
        if (*role == '\0') {
            if (print_prompt_tokens(llama_model_get_vocab(model), tmpl, messages, n_messages) != 0) {
                return 1;
            }
            n_messages = 0;
            continue;
        }
        messages[n_messages++] = (struct llama_chat_message) { role, field };
        field += strlen(field) + 1;
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
