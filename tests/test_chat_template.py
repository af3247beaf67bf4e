"""Chat templates: rendered as transformers renders them, carried into the build (hashed), applied
by ``Chat`` turn by turn and by ``omniforge run``."""

import json
import shutil
from datetime import datetime

import pytest
import torch

from omniforge.cli import main
from omniforge.errors import ConfigError, InputError, ManifestError
from omniforge.runtime.build import Build
from omniforge.runtime.llm import Chat, LlmRuntime
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.tokenizer import TextTokenizer
from tests.test_qwen import write_llm

# Qwen2-Instruct's template (ChatML with a default system message), as its tokenizer_config.json has it
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template (ChatML, tool calls, whitespace control), as its folder holds it
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# bos/eos variables, loop controls, a {% generation %} block, tojson of non-ASCII text, strftime_now
FEATURES_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% generation %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}{% endgeneration %}{{ eos_token }}\n"
    "{% endfor %}{{ {'city': '東京', 'tag': '<b>'} | tojson }} {{ strftime_now('%Y') }}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = [
    {"role": "system", "content": "You describe pictures."},
    {"role": "user", "content": "Describe the image in one sentence."},
    {"role": "assistant", "content": "A dog runs across the harbour at dawn."},
    {"role": "user", "content": "  What do you hear? café 東京 "},
]
TURNS = ["Describe the image.", "A dog runs", "What do you hear?"]
NEW = 8


@pytest.fixture(scope="module")
def chat_qwen(tmp_path_factory):
    """(folder, build, model, tokenizer as transformers loads them): the tiny seeded Qwen2 of
    tests/test_qwen.py with ChatML's stop token and Qwen2.5's template in chat_template.jinja (the
    config's own template, which the file overrides, is a decoy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniforge.export.exporter import export_pipeline

    root = tmp_path_factory.mktemp("chat")
    folder = write_llm(root / "model", "qwen2", True, 2)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|im_end|>", chat_template="decoy {{ messages }}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    export_pipeline(folder, root / "build", log=lambda _m: None)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return folder, root / "build", hf, AutoTokenizer.from_pretrained(folder)


def tokenizer_folder(src, dst, **config):
    """A folder with ``src``'s tokenizer.json and a tokenizer config of its own."""
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", **config}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def ours(folder) -> TextTokenizer:
    return TextTokenizer(
        folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "chat_template.jinja"
    )


def theirs(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_qwen2_template_in_the_config_renders_as_transformers_does(chat_qwen, tmp_path):
    folder = tokenizer_folder(chat_qwen[0], tmp_path / "qwen2", chat_template=QWEN2_TEMPLATE)
    mine, ref = ours(folder), theirs(folder)
    for history in (HISTORY, HISTORY[1:], HISTORY[1:2]):
        for gen in (True, False):
            text = mine.chat_template.render(history, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(history, tokenize=False, add_generation_prompt=gen)
    ids = ref.apply_chat_template(HISTORY, add_generation_prompt=True, return_dict=False)
    assert mine.encode(mine.chat_template.render(HISTORY)) == ids


def test_jinja_file_in_the_build_renders_as_transformers_does(chat_qwen):
    folder, build, _, ref = chat_qwen
    rt = LlmRuntime(build, num_slots=1)
    assert (build / "llm" / "chat_template.jinja").read_text() == QWEN25_TEMPLATE
    for history in (HISTORY, HISTORY[1:]):
        expected = ref.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert rt.apply_chat_template(history) == expected
        assert "decoy" not in expected


def test_named_templates_and_special_token_variables(chat_qwen, tmp_path):
    """The ``default`` of a list of named templates; bos_token is written by the template, not
    added again when the text is tokenized (add_bos_token notwithstanding)."""
    named = [{"name": "default", "template": FEATURES_TEMPLATE}, {"name": "tool_use", "template": "no"}]
    folder = tokenizer_folder(
        chat_qwen[0], tmp_path / "named", bos_token="<|endoftext|>", add_bos_token=True, chat_template=named
    )
    mine, ref = ours(folder), theirs(folder)
    text = mine.chat_template.render(HISTORY)
    assert text == ref.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|endoftext|><|im_start|>user\n") and "東京" in text and "<b>" in text
    assert str(datetime.now().year) in text
    ids = mine.encode(text)
    assert ids == ref.apply_chat_template(HISTORY, add_generation_prompt=True, return_dict=False)
    assert ids.count(mine.token_id("<|endoftext|>")) == 1


def test_bad_templates_and_messages_give_one_sentence(chat_qwen, tmp_path):
    src = chat_qwen[0]

    def tok(name, template):
        return ours(tokenizer_folder(src, tmp_path / name, chat_template=template))

    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}"
    with pytest.raises(
        InputError, match="refuses this conversation: Conversation roles must start with user$"
    ):
        tok("raise", refusing).chat_template.render(HISTORY)
    assert tok("raise2", refusing).chat_template.render(HISTORY[1:2]) == ""
    with pytest.raises(ConfigError, match="the chat template does not parse: line 1: "):
        tok("syntax", "{% for m in messages %}").chat_template.render(HISTORY)
    with pytest.raises(ConfigError, match="none named 'default'"):
        _ = tok("nodefault", [{"name": "tool_use", "template": "x"}]).chat_template
    with pytest.raises(InputError, match="failed on this conversation"):
        tok("type", "{{ messages[0].content + 1 }}").chat_template.render(HISTORY)
    with pytest.raises(InputError, match="failed on this conversation \\(SecurityError"):
        tok("escape", "{{ messages.__class__.__mro__ }}").chat_template.render(HISTORY)
    template = tok("plain", QWEN2_TEMPLATE).chat_template
    for bad, needle in [
        ([], "at least one message"),
        ("hello", "must be a list"),
        ([{"content": "x"}], "message 0 must be a dict with a string 'role'"),
        ([{"role": "user", "content": b"x"}], "message 0's content must be text, got bytes"),
    ]:
        with pytest.raises(InputError, match=needle):
            template.render(bad)
    assert TextTokenizer(src / "tokenizer.json").chat_template is None


def test_chat_turns_equal_transformers_generate_on_the_templated_history(chat_qwen):
    _, build, hf, ref = chat_qwen
    eos = ref.convert_tokens_to_ids("<|im_end|>")
    rt = LlmRuntime(build, num_slots=2)
    chat = Chat(rt, GenerationConfig(max_new_tokens=NEW), system=HISTORY[0]["content"])
    assert chat.template
    history = [HISTORY[0]]
    for turn, text in enumerate(TURNS):
        result = chat.send(text)
        history.append({"role": "user", "content": text})
        ids = ref.apply_chat_template(history, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        expected = out[0, len(ids) :].tolist()
        assert result.token_ids == expected and result.prompt_tokens == len(ids)
        reply = ref.decode(expected, skip_special_tokens=True)
        assert result.text == reply
        history.append({"role": "assistant", "content": reply})
        assert chat.messages == history
        if turn:  # the earlier turns were a cached prefix
            assert result.reused_prefix_tokens >= 16


def test_chat_media_fill_the_conversations_placeholders_in_order(chat_qwen):
    """Each turn re-renders the whole conversation: the media of every turn fill its placeholders."""
    import numpy as np

    _, build, _, _ = chat_qwen
    rt = LlmRuntime(build, num_slots=2)
    rt.build.pipeline.placeholders["image"] = "[IMG0]"  # this runtime's build only: an image placeholder
    rt.placeholder_ids = {rt.tokenizer.token_id("[IMG0]"): "image"}
    a, b = (np.full((n, rt.geometry.hidden_size), v, np.float32) for n, v in ((3, 1.0), (2, 0.5)))
    cfg = GenerationConfig(max_new_tokens=4)
    chat = Chat(rt, cfg)
    chat.send("[IMG0] What is it?", media={"image": [a]})
    second = chat.send("And [IMG0]?", media={"image": [b]})
    rows, ids = rt.prepare(rt.apply_chat_template(chat.messages[:-1]), {"image": [a, b]})
    assert second.prompt_tokens == len(rows) == len(ids) + 3
    assert second.token_ids == rt.generate_rows([rows], [ids], cfg)[0].token_ids
    empty = Chat(rt, cfg)
    empty.send("[IMG0] no image given")
    with pytest.raises(InputError, match="an earlier turn left an empty image placeholder"):
        empty.send("[IMG0] now", media={"image": [a]})


def test_chat_without_template_and_refusals(chat_qwen):
    _, build, _, _ = chat_qwen
    rt = LlmRuntime(build, num_slots=2)
    cfg = GenerationConfig(max_new_tokens=4)
    raw = Chat(rt, cfg, template=False)
    assert raw.send(TURNS[0]).token_ids == rt.generate(TURNS[0], cfg).token_ids
    with pytest.raises(ConfigError, match="a system message needs a chat template"):
        Chat(rt, cfg, template=False, system="hi")
    with pytest.raises(InputError, match="a chat message must be text"):
        Chat(rt, cfg).send(b"hi")
    rt.tokenizer = TextTokenizer(build / "llm" / "tokenizer.json")  # a tokenizer without a template
    assert not Chat(rt, cfg).template
    with pytest.raises(ConfigError, match="this build has no chat template"):
        Chat(rt, cfg, template=True)
    with pytest.raises(ConfigError, match="this build has no chat template"):
        rt.apply_chat_template(HISTORY)


def test_cli_run_applies_the_template_unless_told_not_to(chat_qwen, capsys):
    _, build, _, _ = chat_qwen
    rt = LlmRuntime(build, num_slots=1)
    cfg = GenerationConfig(max_new_tokens=NEW)
    args = ["run", str(build), "--prompt", TURNS[0], "--max-new-tokens", str(NEW)]
    cases = [
        ([], rt.apply_chat_template([{"role": "user", "content": TURNS[0]}])),
        (
            ["--system", "Be brief."],
            rt.apply_chat_template(
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TURNS[0]}]
            ),
        ),
        (["--no-chat-template"], TURNS[0]),
    ]
    for extra, prompt in cases:
        assert main([*args, *extra]) == 0
        out = capsys.readouterr()
        assert out.out == rt.generate(prompt, cfg).text + "\n"
        assert f"{len(rt.tokenizer.encode(prompt))} prompt tokens" in out.err
    assert main([*args, "--no-chat-template", "--system", "x"]) == 1
    assert "--system needs the chat template" in capsys.readouterr().err


def test_the_manifest_hashes_the_template(chat_qwen, tmp_path):
    _, build, _, _ = chat_qwen
    manifest = Build(build).manifest
    assert manifest.files["chat_template"] == "llm/chat_template.jinja"
    assert "llm/chat_template.jinja" in manifest.artifacts
    copy = shutil.copytree(build, tmp_path / "build")
    path = copy / "llm" / "chat_template.jinja"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="'llm/chat_template.jinja' does not match its SHA-256"):
        Build(copy)
