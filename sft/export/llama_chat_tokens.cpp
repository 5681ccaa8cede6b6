// llama-chat-tokens [--jinja [KEY=JSON ...]] MODEL.gguf < conversations: the token ids llama.cpp gives each
// conversation's chat prompt, with the assistant's prompt added.
//
// The chat template is the GGUF's own. Without --jinja it is applied by llama_chat_apply_template, llama.cpp's
// built-in template detector and renderer (the C API's path, llama-simple-chat, --no-jinja); with --jinja by the
// Jinja engine that llama-cli and llama-server use by default (common_chat_templates_apply; thinking off, as
// lccc-sft trains and serves; each KEY=JSON is a template variable, as llama-server's --chat-template-kwargs gives
// them: llama.cpp sets `date_string` to today unless told). The text is tokenized by llama_tokenize with special tokens parsed and a BOS added
// when the vocabulary says so, as llama-server does. Only the vocabulary is loaded.
// stdin: NUL-terminated fields role, content, role, content, ...; an empty role ends a conversation.
// stdout: one line per conversation, its token ids separated by spaces. Exit 1 with one line on stderr when the
// template cannot be applied. Built by `make llama-cpp` against its libllama and libllama-common.
#include "chat.h"
#include "llama.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

static std::string built_in_prompt(const char * tmpl, const std::vector<common_chat_msg> & messages) {
    std::vector<llama_chat_message> chat;
    for (const auto & message : messages) {
        chat.push_back({message.role.c_str(), message.content.c_str()});
    }
    int32_t length = llama_chat_apply_template(tmpl, chat.data(), chat.size(), true, nullptr, 0);
    if (length < 0) {
        throw std::runtime_error("llama_chat_apply_template does not know this model's chat template");
    }
    std::string text(length, '\0');
    llama_chat_apply_template(tmpl, chat.data(), chat.size(), true, text.data(), length + 1);
    return text;
}

static std::string jinja_prompt(const common_chat_templates * templates, const std::vector<common_chat_msg> & messages,
                                const std::map<std::string, std::string> & kwargs) {
    common_chat_templates_inputs inputs;
    inputs.messages = messages;
    inputs.enable_thinking = false;
    inputs.chat_template_kwargs = kwargs;
    return common_chat_templates_apply(templates, inputs).prompt;
}

static void print_tokens(const llama_vocab * vocab, const std::string & text) {
    int32_t n_tokens = -llama_tokenize(vocab, text.data(), text.size(), nullptr, 0, true, true);
    std::vector<llama_token> tokens(n_tokens);
    llama_tokenize(vocab, text.data(), text.size(), tokens.data(), n_tokens, true, true);
    for (size_t i = 0; i < tokens.size(); i++) {
        printf(i ? " %d" : "%d", tokens[i]);
    }
    printf("\n");
}

int main(int argc, char ** argv) {
    bool jinja = argc >= 3 && std::string(argv[1]) == "--jinja";
    std::map<std::string, std::string> kwargs;
    for (int i = 2; jinja && i < argc - 1; i++) {
        std::string kwarg = argv[i];
        size_t equals = kwarg.find('=');
        if (equals == std::string::npos) {
            jinja = false;  // not KEY=JSON: the usage line below
            break;
        }
        kwargs[kwarg.substr(0, equals)] = kwarg.substr(equals + 1);
    }
    if (argc != 2 && !jinja) {
        fprintf(stderr, "usage: %s [--jinja [KEY=JSON ...]] MODEL.gguf < conversations\n", argv[0]);
        return 2;
    }
    const char * path = argv[argc - 1];
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params params = llama_model_default_params();
    params.vocab_only = true;
    llama_model * model = llama_model_load_from_file(path, params);
    if (model == nullptr) {
        fprintf(stderr, "error: llama.cpp cannot load %s\n", path);
        return 1;
    }
    const char * tmpl = llama_model_chat_template(model, nullptr);
    if (tmpl == nullptr) {
        fprintf(stderr, "error: %s has no chat template\n", path);
        return 1;
    }
    common_chat_templates_ptr templates = common_chat_templates_init(model, "");
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    std::vector<std::string> fields;
    for (size_t start = 0; start < input.size();) {
        size_t end = input.find('\0', start);
        end = end == std::string::npos ? input.size() : end;  // a last field without its NUL still ends
        fields.push_back(input.substr(start, end - start));
        start = end + 1;
    }
    std::vector<common_chat_msg> messages;
    try {
        for (size_t i = 0; i < fields.size(); i++) {
            if (fields[i].empty()) {
                std::string text = jinja ? jinja_prompt(templates.get(), messages, kwargs) : built_in_prompt(tmpl, messages);
                print_tokens(llama_model_get_vocab(model), text);
                messages.clear();
                continue;
            }
            common_chat_msg message;
            message.role = fields[i];
            message.content = i + 1 < fields.size() ? fields[++i] : "";
            messages.push_back(message);
        }
    } catch (const std::exception & err) {
        fprintf(stderr, "error: %s\n", err.what());
        return 1;
    }
    templates.reset();
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
