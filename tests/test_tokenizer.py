"""Tokenizer and tiny-tokenizer tests: parity with transformers.AutoTokenizer, HF file formats, clear errors."""
import json
import shutil
from pathlib import Path

import pytest

from nanogrpo.tiny import (ENDOFTEXT, ENDOFTEXT_ID, TINY_CHARS, TINY_MODEL_CONFIG, build_tiny_tokenizer,
                           write_tiny_model_dir)
from nanogrpo.tokenizer import ChatTemplateError, Tokenizer


# ---------------------------------------------------------------- fixtures (each 11 MB tokenizer loaded once)


@pytest.fixture(scope="module")
def ours(qwen_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return build_tiny_tokenizer(tmp_path / "tiny")


def hf_ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returned the list.
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Temperature in °C at a place; returns <unknown> when offline & café names are fine",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich"},
                           "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "a+b",
                                             "parameters": {"type": "object", "properties": {
                                                 "a": {"type": "number"}, "b": {"type": "number"}}}}}

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Name a prime > 10."}],
    "multi_turn": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Spell 'naïve' backwards, 日本語 too."},
        {"role": "assistant", "content": "evïan / 語本日"},
        {"role": "user", "content": "Thanks\n\nbye"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Zürich and 2+3?"},
        # content=None next to tool_calls is what OpenAI-style APIs send; transformers drops None keys.
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 1}}},
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
        ]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "21 °C, and 5."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]},
        {"role": "tool", "content": "{\"temp\": 19}"},
    ],
}

# ---------------------------------------------------------------- chat template parity with transformers


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_qwen_chat_template_matches_transformers(ours, hf, name, add_generation_prompt):
    """Guards against prompts that differ from the ones the model was trained on: wrong Jinja whitespace
    options (trim_blocks/lstrip_blocks), Jinja's HTML-escaping tojson ('<' -> \\u003c, ASCII-escaped 'ü') in
    tool schemas and arguments, a missing default system prompt, or None-valued keys rendered as 'None'."""
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL, ADD_TOOL] if name == "tools" else None
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    want = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                  tokenize=False)
    assert got == want
    got_ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       tokenize=True)
    assert got_ids == hf_ids(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=tools, tokenize=True))


def test_qwen_chat_template_shape(ours):
    """Guards against silently losing the template's own pieces: the injected default system prompt, the
    generation header, and control tokens encoded as single ids rather than as text."""
    text = ours.apply_chat_template(CONVERSATIONS["no_system"], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>assistant\n")
    ids = ours.apply_chat_template(CONVERSATIONS["no_system"], add_generation_prompt=True, tokenize=True)
    # The fixture's PROVENANCE.md gives this prefix for the released Qwen2.5 tokenizer.
    assert ids[:7] == [151644, 8948, 198, 2610, 525, 1207, 16948]
    assert ids.count(151644) == 3 and ids.count(151645) == 2


CUSTOM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'stop' %}{% break %}{% endif %}"
    "{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}"
    "{% else %}{{ m.role }}: {{ m.content | tojson(indent=2, sort_keys=True) }}\n"
    "{{ m.content | tojson(separators=(',', ':')) }}\n{% endif %}"
    "{% endfor %}"
    "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ greeting }}|{{ tools | tojson }}"
    "|{{ documents is none }}\n"
    # Indented block tags on their own lines: only trim_blocks + lstrip_blocks drop this whitespace.
    "  {% if add_generation_prompt %}\n"
    "    {% for i in range(2) %}\n"
    ">{{ i }}\n"
    "    {% endfor %}\n"
    "  {% endif %}\n"
)


def test_custom_template_features_match_transformers(ours, hf):
    """Guards against an environment that differs from transformers': tojson keyword args (indent,
    separators, sort_keys) and ensure_ascii=False, loopcontrols ({% break %}/{% continue %}), the
    {% generation %} tag (a parse error without it), whitespace control (trim_blocks/lstrip_blocks; the
    Qwen template uses '{%-' everywhere so it cannot catch this), the `documents` variable, special-token
    variables and extra kwargs."""
    messages = [
        {"role": "user", "content": {"b": "ünï <code>", "a": [1, 2]}},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never"},
    ]
    kw = dict(add_generation_prompt=True, tools=[ADD_TOOL], chat_template=CUSTOM_TEMPLATE, greeting="hé")
    got = ours.apply_chat_template(messages, **kw)
    assert got == hf.apply_chat_template(messages, tokenize=False, **kw)
    assert "[ok]" in got and "never" not in got and "hidden" not in got and got.endswith("|True\n>0\n>1\n")


def test_raise_exception_and_strftime_now(ours):
    """Guards against templates' raise_exception() being swallowed or turned into an obscure Jinja error,
    and against a missing strftime_now global (Llama-3-style templates print today's date)."""
    with pytest.raises(ChatTemplateError, match="only user and assistant roles"):
        ours.apply_chat_template([{"role": "x", "content": ""}],
                                 chat_template="{{ raise_exception('only user and assistant roles') }}")
    year = ours.apply_chat_template([{"role": "user", "content": ""}], chat_template="{{ strftime_now('%Y') }}")
    assert year.isdigit() and len(year) == 4


def test_template_is_sandboxed(ours):
    """Guards against running a model repo's template outside the sandbox (attribute escapes to Python
    internals) or letting it mutate the caller's messages."""
    import jinja2
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(messages, chat_template="{{ messages[0].update({'role': 'x'}) }}")
    assert messages == [{"role": "user", "content": "hi"}]

# ---------------------------------------------------------------- encode / decode parity


ENCODE_STRINGS = [
    "Hello world",
    "  leading spaces\n\nand\ttabs, trailing  ",
    "Grüße, 世界! 🙂 café naïve",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "(3 + 5) * 7 = 56; x=3.14159e-2",
]


def test_encode_decode_match_transformers(ours, hf):
    """Guards against a different BPE pipeline or special-token handling than transformers' (ids the model
    never saw), and against lossy decoding of byte-level unicode. Strings are NFC: transformers 5 rebuilds
    Qwen2Tokenizer with an NFC normalizer that this fixture's tokenizer.json does not declare."""
    assert ours.encode("Hello world") == [9707, 1879]
    for s in ENCODE_STRINGS:
        ids = ours.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == hf.decode(ids) == s
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    batch = [ours.encode(s) for s in ENCODE_STRINGS]
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    # Special tokens in text become their single ids, as in the rendered chat template.
    assert ours.encode("<|im_end|>") == [151645]


def test_special_ids_and_sizes_match_transformers(ours, hf):
    """Guards against stopping generation on the wrong token (Qwen2.5-Instruct's eos is <|im_end|>, not
    <|endoftext|>), padding with a real token, or an embedding table sized without the added tokens."""
    assert ours.eos_token_id == hf.eos_token_id == 151645
    assert ours.pad_token_id == hf.pad_token_id == 151643
    assert ours.bos_token_id is None and hf.bos_token_id is None
    assert ours.vocab_size == len(hf) == 151646
    assert ours.convert_tokens_to_ids(["<|im_start|>", "Hello"]) == hf.convert_tokens_to_ids(["<|im_start|>",
                                                                                                "Hello"])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        ours.convert_tokens_to_ids("<|no such token|>")


def test_decode_accepts_tensors(ours):
    """Guards against decode failing on the 1-D id tensors the sampler produces."""
    import torch
    assert ours.decode(torch.tensor([9707, 1879])) == "Hello world"
    assert ours.batch_decode(torch.tensor([[9707, 1879]])) == ["Hello world"]


def test_qwen_save_pretrained_round_trip(ours, tmp_path):
    """Guards against save_pretrained writing files that lose the template or special tokens, or that
    transformers cannot load."""
    transformers = pytest.importorskip("transformers")
    out = ours.save_pretrained(tmp_path / "saved")
    again = Tokenizer.from_pretrained(out)
    msgs = CONVERSATIONS["multi_turn"]
    assert again.apply_chat_template(msgs, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert (again.eos_token_id, again.pad_token_id, again.vocab_size) == \
        (ours.eos_token_id, ours.pad_token_id, ours.vocab_size)
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded.encode("Hello world") == [9707, 1879] and reloaded.eos_token_id == 151645
    assert reloaded.apply_chat_template(msgs, tokenize=False) == ours.apply_chat_template(msgs)

# ---------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_one_id_per_char_and_round_trip(tiny_dir):
    """Guards against a tiny vocabulary that merges, drops or byte-splits characters (the arithmetic reward
    and the model's answer length both assume one id per character) and against lossy decoding (spaces)."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    ids = [tok.encode(c) for c in TINY_CHARS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(TINY_CHARS)
    for s in ["3,5,7:26=(3+5)*7-4/2", "  1 2  ", "(((9)))", TINY_CHARS * 3]:
        assert len(tok.encode(s)) == len(s)
        assert tok.decode(tok.encode(s)) == s
    assert tok.eos_token_id == tok.pad_token_id == ENDOFTEXT_ID == tok.convert_tokens_to_ids(ENDOFTEXT)
    assert tok.bos_token_id is None
    assert tok.vocab_size == len(TINY_CHARS) + 3
    assert tok.encode("12" + ENDOFTEXT) == tok.encode("12") + [ENDOFTEXT_ID]
    assert tok.decode(tok.encode("12" + ENDOFTEXT), skip_special_tokens=True) == "12"


def test_tiny_chat_template(tiny_dir):
    """Guards against the tiny prompt format drifting from what the task and reward expect: contents
    concatenated, '=' appended only when asking for a completion."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": "3,5,7:26"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == "3,5,7:26="
    assert tok.apply_chat_template(msgs) == "3,5,7:26"
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) == tok.encode("3,5,7:26=")


def test_tiny_loads_in_transformers(tmp_path):
    """Guards against tiny files that only our loader understands, and against transformers 5 silently
    re-tokenizing differently: next to a qwen2 config.json it ignores tokenizer_class and rebuilds the
    pipeline as a byte-level Qwen2Tokenizer from our vocab."""
    transformers = pytest.importorskip("transformers")
    s = "(12+3)*4 = 60, 7-1/2:"
    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    model_dir = write_tiny_model_dir(tmp_path / "model")
    ours = Tokenizer.from_pretrained(model_dir)
    for d in (tok_dir, model_dir):
        theirs = transformers.AutoTokenizer.from_pretrained(d)
        assert theirs.encode(s, add_special_tokens=False) == ours.encode(s), d
        assert theirs.decode(ours.encode(s)) == s
        assert theirs.eos_token_id == theirs.pad_token_id == ENDOFTEXT_ID
        msgs = [{"role": "user", "content": "3,5,7:26"}]
        assert theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == "3,5,7:26="


def test_tiny_model_config(tmp_path):
    """Guards against a config whose vocab is smaller than the tokenizer's or whose special ids point at
    the wrong token, and against a config.json transformers would refuse or read differently."""
    transformers = pytest.importorskip("transformers")
    d = write_tiny_model_dir(tmp_path / "model")
    tok = Tokenizer.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == TINY_MODEL_CONFIG
    assert cfg["vocab_size"] % 8 == 0 and tok.vocab_size <= cfg["vocab_size"] < tok.vocab_size + 8
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == cfg["bos_token_id"] == tok.eos_token_id
    hf_cfg = transformers.AutoConfig.from_pretrained(d)
    assert hf_cfg.model_type == "qwen2" and hf_cfg.vocab_size == cfg["vocab_size"]
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_key_value_heads) == (128, 4, 2)
    assert hf_cfg.tie_word_embeddings is True
    assert not (d / "model.safetensors").exists()

# ---------------------------------------------------------------- template file formats


def test_chat_template_jinja_file_and_named_templates(tiny_dir):
    """Guards against ignoring newer HF saves (chat_template.jinja beside the config takes precedence) and
    against mis-reading the list-of-named-templates format (tools select 'tool_use')."""
    transformers = pytest.importorskip("transformers")
    msgs = [{"role": "user", "content": "1,2"}]
    cfg_path = tiny_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D:{{ messages[0].content }}"},
                            {"name": "tool_use", "template": "T:{{ tools | length }}"}]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for tools in (None, [ADD_TOOL]):
        assert tok.apply_chat_template(msgs, tools=tools) == \
            theirs.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert tok.apply_chat_template(msgs, tools=[ADD_TOOL]) == "T:1"

    (tiny_dir / "chat_template.jinja").write_text("J:{{ messages | length }}")
    tok = Tokenizer.from_pretrained(tiny_dir)
    assert tok.apply_chat_template(msgs) == "J:1" == \
        transformers.AutoTokenizer.from_pretrained(tiny_dir).apply_chat_template(msgs, tokenize=False)


def test_special_token_as_added_token_dict(tiny_dir):
    """Guards against crashing on configs saved by older transformers, which spell special tokens as
    serialized AddedToken dicts instead of strings."""
    cfg_path = tiny_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = {"__type": "AddedToken", "content": ENDOFTEXT, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": True}
    cfg_path.write_text(json.dumps(cfg))
    assert Tokenizer.from_pretrained(tiny_dir).eos_token_id == ENDOFTEXT_ID

# ---------------------------------------------------------------- errors


def test_missing_directory_error(tmp_path):
    """Guards against a typo'd path surfacing as an obscure Rust/JSON error instead of naming the path."""
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer.*does not exist"):
        Tokenizer.from_pretrained(missing)


def test_missing_tokenizer_json_error(tiny_dir):
    """Guards against a directory with only a config (e.g. a model dir without tokenizer files) being
    accepted or failing with an unclear message."""
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_pretrained(tiny_dir)


def test_no_chat_template_error(tiny_dir):
    """Guards against a base-model tokenizer without a chat template rendering nothing or a half prompt:
    the error must name the directory and say it has no chat_template."""
    cfg_path = tiny_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="no chat_template") as err:
        tok.apply_chat_template([{"role": "user", "content": "1"}])
    assert str(tiny_dir) in str(err.value)


def test_bad_config_errors(tiny_dir, tmp_path):
    """Guards against malformed configs (broken JSON, eos missing or not in the vocabulary) failing later,
    deep in sampling, instead of at load time with the file named."""
    cfg_path = tiny_dir / "tokenizer_config.json"
    good = cfg_path.read_text()
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tiny_dir)
    cfg = json.loads(good)
    cfg["eos_token"] = "<|eot_id|>"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="eos_token '<\\|eot_id\\|>' is not in the vocabulary"):
        Tokenizer.from_pretrained(tiny_dir)
    cfg["eos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no eos_token"):
        Tokenizer.from_pretrained(tiny_dir)
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json is missing"):
        Tokenizer.from_pretrained(copy)
