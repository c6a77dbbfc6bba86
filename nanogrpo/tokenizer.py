"""Tokenizer: a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) without transformers.

The byte-pair work is done by the `tokenizers` library reading `tokenizer.json` as is; this file adds the
pieces a trainer needs from `tokenizer_config.json` (special tokens, chat template) and renders chat templates
with the same Jinja setup as `transformers`, so a prompt we build is byte-identical to the one the model was
trained on. Tested against `transformers.AutoTokenizer` in tests/test_tokenizer.py.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer HF saves put the default template here
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # ... and named extra templates here, one .jinja each

# The named special tokens transformers hands to a chat template as variables (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A chat template called raise_exception(...) or could not be rendered."""


def _token_content(value: Any, field: str, source: Path) -> str | None:
    # HF configs spell a special token as a plain string, as null, or as a serialized AddedToken dict
    # ({"content": "<|im_end|>", "__type": "AddedToken", ...}) depending on the transformers version that saved them.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: field {field!r} should be a string, null or {{'content': ...}}, got {value!r}")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _as_id_list(ids: Any) -> list[int]:
    # Callers hand us lists, tuples or 1-D tensors; the Rust side only takes a list of Python ints.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):  # a single id, or a 0-d tensor after tolist()
        return [ids]
    return [int(i) for i in ids]


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers registers this tag so training templates can mark assistant spans for its assistant-token
    mask; without it such templates fail to *parse*. We only need them to render identically.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller):
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes ('<' -> '\u003c') and returns Markup; chat templates expect the
    # plain json.dumps text (non-ASCII kept), which is what transformers substitutes.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template(s) of an HF tokenizer directory."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | dict[str, str] | None = None,
                 special_tokens: Mapping[str, str | None] | None = None, config: Mapping[str, Any] | None = None,
                 source: str = "<in-memory tokenizer>"):
        self.backend = backend
        self.source = source  # where it was loaded from; named in every error message
        # Every named special token (bos/eos/unk/...), as transformers exposes them to chat templates.
        self.special_tokens: dict[str, str | None] = {name: None for name in SPECIAL_TOKEN_NAMES}
        self.special_tokens.update(special_tokens or {})
        self.special_tokens.update(eos_token=eos_token, pad_token=pad_token, bos_token=bos_token)
        # str, or {name: template} for repos with several templates (e.g. "default" and "tool_use").
        self.chat_template = chat_template
        # The remaining tokenizer_config.json fields, kept so save_pretrained round-trips what it does not use.
        self.config = dict(config or {})
        for name, token in self.special_tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {name} {token!r} is not in the vocabulary of {TOKENIZER_FILE}")
        self._env: ImmutableSandboxedEnvironment | None = None
        self._compiled: dict[str, jinja2.Template] = {}  # template text -> compiled template

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        if not d.is_dir():
            problem = "is not a directory" if d.exists() else "does not exist"
            raise FileNotFoundError(f"tokenizer directory {d} {problem} (expected {TOKENIZER_FILE} and "
                                    f"{CONFIG_FILE} inside it)")
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} is missing: a tokenizer directory needs {TOKENIZER_FILE} "
                                        f"and {CONFIG_FILE}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE))
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ValueError(f"{d / TOKENIZER_FILE} could not be read by the tokenizers library: {e}") from e
        config = _read_json(d / CONFIG_FILE)
        special = {name: _token_content(config.pop(name, None), name, d / CONFIG_FILE) for name in SPECIAL_TOKEN_NAMES}
        if special["eos_token"] is None:
            # GRPO sampling stops on EOS, so a tokenizer without one is unusable here, not just incomplete.
            raise ValueError(f"{d / CONFIG_FILE} has no eos_token; nanogrpo needs one to end completions")
        return cls(backend, eos_token=special["eos_token"], pad_token=special["pad_token"],
                   bos_token=special["bos_token"], special_tokens=special,
                   chat_template=cls._load_chat_template(d, config.pop("chat_template", None)),
                   config=config, source=str(d))

    @staticmethod
    def _load_chat_template(d: Path, from_config: Any) -> str | dict[str, str] | None:
        # Same precedence as transformers: standalone .jinja files, when present, replace whatever
        # tokenizer_config.json says; a lone default template is a plain string.
        files: dict[str, str] = {}
        if (d / CHAT_TEMPLATE_FILE).is_file():
            files["default"] = (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (d / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((d / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if files:
            return files["default"] if list(files) == ["default"] else files
        if from_config is None or isinstance(from_config, str):
            return from_config
        if isinstance(from_config, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys()
                                                 for t in from_config):
            return {t["name"]: t["template"] for t in from_config}
        raise ValueError(f"{d / CONFIG_FILE}: chat_template should be a string or a list of "
                         f"{{'name': ..., 'template': ...}}, got {type(from_config).__name__}")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json so that both this class and transformers load them."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / TOKENIZER_FILE))
        config = dict(self.config)
        config.update(self.special_tokens)
        # A generic class makes transformers use tokenizer.json as is; keep a loaded repo's own class (e.g.
        # Qwen2Tokenizer) since transformers 5 rebuilds that one's pipeline from the same vocab and merges.
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # transformers' space clean-up (" ," -> ",") would corrupt decoded text; never opt into it by default.
        config.setdefault("clean_up_tokenization_spaces", False)
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
            if (d / CHAT_TEMPLATE_FILE).is_file():
                # A stale chat_template.jinja would take precedence over the config on the next load.
                (d / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        with open(d / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
        return d

    # ---------------------------------------------------------------- ids and text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([_as_id_list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            i = self.backend.token_to_id(tokens)
            if i is None:
                raise KeyError(f"token {tokens!r} is not in the vocabulary of {self.source}")
            return i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token(self) -> str:
        return self.special_tokens["eos_token"]

    @property
    def eos_token_id(self) -> int:
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int:
        # Padding positions are masked out, so any id works; EOS is the conventional stand-in (Llama, GPT-2).
        pad = self._id_of("pad_token")
        return self.eos_token_id if pad is None else pad

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")  # Qwen2 has none

    @property
    def vocab_size(self) -> int:
        # Including added tokens (like len(hf_tokenizer)); HF's own .vocab_size excludes them.
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- chat template

    def _environment(self) -> ImmutableSandboxedEnvironment:
        # Built once per tokenizer. Chat templates come from model repos, i.e. untrusted code: the immutable
        # sandbox stops attribute escapes and in-place edits of the caller's messages.
        if self._env is None:
            source = self.source

            def raise_exception(message: str):
                raise ChatTemplateError(f"chat template of {source}: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._env = env
        return self._env

    def _select_template(self, chat_template: str | None, tools: Any) -> str:
        # transformers' rules: a name picks from the dict; otherwise "tool_use" when tools are given, else "default".
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"{self.source} has several chat templates {sorted(templates)} and none named "
                             "'default'; pass chat_template=<name>")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(f"tokenizer {self.source} has no chat_template (none in {CONFIG_FILE} nor a "
                             f"{CHAT_TEMPLATE_FILE} file); pass chat_template=... or use a chat model's tokenizer")
        return templates

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs) -> str | list[int]:
        """Render one conversation like `transformers`' apply_chat_template; ids if tokenize=True.

        Extra kwargs become template variables and override the special-token variables of the same name.
        """
        template = self._select_template(chat_template, tools)
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys: APIs send content=None / tool_calls=None, and templates test for
        # a key's presence (`message.tool_calls is defined`) or concatenate content, which None would break.
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise TypeError(f"message {i} should be a dict with 'role' and 'content', got {type(m).__name__}")
            chat.append({k: v for k, v in m.items() if v is not None})
        if tools is not None:
            tools = list(tools)
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):
                    raise TypeError(f"tool {i} should be a JSON-schema dict, got {type(t).__name__}")
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = self._environment().from_string(template)
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        variables.setdefault("documents", None)
        text = compiled.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
        # The template wrote the control tokens as text; encoding must not add BOS/EOS a second time.
        return self.encode(text, add_special_tokens=False) if tokenize else text
