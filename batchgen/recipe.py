"""Recipes (YAML -> JobConfig fields) and prompt rendering (sandboxed Jinja + chat template).

A recipe is a YAML mapping with the sections below; an unknown key is rejected with its
dotted name. `--set key=value` uses the same dotted names (`--set sampling.top_k=20`).

    model: null                      # null: the default small model
    input:    {format, prompt_column, split}
    prompt:   {template, system, chat}
    sampling: {temperature, top_p, top_k, max_tokens, seed, stop, ...}   # SamplingParams
    output:   {format, keep, rows_per_part, parse_json}
    engine:   {device, dtype, max_model_len, max_num_seqs, max_num_batched_tokens,
               gpu_memory_utilization, tokenizer, load_format, tensor_parallel_size}
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from batchgen.job.config import field_type_error
from batchgen.sampling_params import SamplingParams

# dotted recipe key -> JobConfig field
RECIPE_KEYS = {
    "model": "model",
    "input.format": "input_format",
    "input.prompt_column": "prompt_column",
    "input.split": "split",
    "prompt.template": "template",
    "prompt.system": "system",
    "prompt.chat": "chat",
    "output.format": "format",
    "output.keep": "keep",
    "output.rows_per_part": "rows_per_part",
    "output.parse_json": "parse_json",
    "engine.device": "device",
    "engine.dtype": "dtype",
    "engine.max_model_len": "max_model_len",
    "engine.max_num_seqs": "max_num_seqs",
    "engine.max_num_batched_tokens": "max_num_batched_tokens",
    "engine.gpu_memory_utilization": "gpu_memory_utilization",
    "engine.tokenizer": "tokenizer",
    "engine.load_format": "load_format",
    "engine.tensor_parallel_size": "tensor_parallel_size",
    "sampling.seed": "seed",
}
_SECTIONS = {"input", "prompt", "sampling", "output", "engine"}
_SAMPLING_FIELDS = {name for name in SamplingParams.__dataclass_fields__ if not name.startswith("_")}
# The name under which a template sees the whole record (for keys that are not identifiers).
RECORD_VARIABLE = "record"


class RecipeError(ValueError):
    """A bad recipe or --set override; the message names the file and key."""


class PromptTemplateError(ValueError):
    """A template that does not compile or is unsafe."""


class RowError(ValueError):
    """This row cannot be turned into a prompt; it becomes an output row with `error` set."""


# ---- recipes ------------------------------------------------------------------------


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into JobConfig fields (plus `sampling`: a dict)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path}: not valid YAML: {_describe_yaml_error(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: must be a mapping of sections, got {type(data).__name__}")
    return flatten_recipe(data, source=str(path))


def _describe_yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what (context: problem) and where (the problem's mark)."""
    what = ": ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None))
                     if p) or str(e)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        what += f" (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(what.split())


def flatten_recipe(data: dict[str, Any], source: str = "recipe") -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: section {key!r} must be a mapping")
            for sub, sub_value in value.items():
                set_recipe_key(fields, f"{key}.{sub}", sub_value, source)
        else:
            set_recipe_key(fields, str(key), value, source)
    return fields


def set_recipe_key(fields: dict[str, Any], key: str, value: Any, source: str = "--set") -> None:
    """Set dotted recipe `key` in the JobConfig `fields` (in place)."""
    if key in RECIPE_KEYS:
        problem = field_type_error(RECIPE_KEYS[key], value)
        if problem is not None:  # named here, by its recipe key
            raise RecipeError(f"{source}: {key} {problem}")
        fields[RECIPE_KEYS[key]] = value
        return
    section, _, name = key.partition(".")
    if section == "sampling" and name in _SAMPLING_FIELDS:
        fields.setdefault("sampling", {})[name] = value
        return
    known = sorted(RECIPE_KEYS) + ["sampling.<SamplingParams field>"]
    hint = _closest_key(key)
    hint = f"did you mean {hint!r}? " if hint else ""
    raise RecipeError(f"{source}: unknown key {key!r} ({hint}known: {', '.join(known)})")


def _closest_key(key: str) -> str | None:
    """The known key a mistyped or misplaced one most likely means: the same name in another
    section (`template` -> `prompt.template`), else the nearest spelling."""
    known = sorted(set(RECIPE_KEYS) | {f"sampling.{name}" for name in _SAMPLING_FIELDS})
    name = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    if len(same_name) == 1:
        return same_name[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


def apply_overrides(fields: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply `key=value` strings (value parsed as YAML) to `fields` in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected key=value")
        set_recipe_key(fields, key.strip(), _override_value(key.strip(), raw), source="--set")


_NULLS = {"", "~", "null", "Null", "NULL"}


def _override_value(key: str, raw: str) -> Any:
    """`raw` read as YAML, except where YAML would change what the user typed: text that YAML
    reads as a comment (`sampling.stop=###`, a template starting with `#`) would be null, and
    a text key (a template, system prompt, column name) would get a mapping, number or
    boolean (`prompt.system=Answer: yes or no`, `input.prompt_column=2023`); those take the
    text as typed. An explicit `null` (or nothing) is still null."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if value is None:
        return None if raw.strip() in _NULLS else raw
    is_text_key = key in RECIPE_KEYS and field_type_error(RECIPE_KEYS[key], "text") is None
    return raw if is_text_key and not isinstance(value, str) else value


# ---- prompts ------------------------------------------------------------------------

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                     keep_trailing_newline=False)


def compile_template(text: str):
    try:
        return _ENV.from_string(text)
    except TemplateSyntaxError as e:
        raise PromptTemplateError(f"prompt template: {e.message} (line {e.lineno})") from None


def template_variables(text: str) -> set[str]:
    """The row fields a template reads (its undeclared names, minus `record`)."""
    return meta.find_undeclared_variables(_ENV.parse(text)) - {RECORD_VARIABLE}


class PromptRenderer:
    """Row fields -> prompt token ids. Raises RowError for a row that has no usable prompt.

    `chat`: apply the tokenizer's chat template (then tokenize without special tokens:
    the template already has them); None: when the tokenizer has one.
    """

    def __init__(self, tokenizer, *, prompt_column: str | None = None, template: str | None = None,
                 system: str | None = None, chat: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_column = prompt_column
        self.template = compile_template(template) if template is not None else None
        self.template_fields = sorted(template_variables(template)) if template is not None else []
        self.system = system
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.is_chat = has_template if chat is None else chat
        if self.is_chat and not has_template:
            raise PromptTemplateError("chat=true but the model's tokenizer has no chat template")

    def prompt_text(self, fields: dict[str, Any]) -> str:
        if self.template is not None:
            for name in self.template_fields:
                if name not in fields:
                    raise RowError(f"missing field {name!r}")
                if fields[name] is None:
                    raise RowError(f"field {name!r} is null")
            try:
                text = self.template.render({**fields, RECORD_VARIABLE: fields})
            except (UndefinedError, SecurityError) as e:
                raise RowError(f"prompt template: {e}") from None
            except Exception as e:  # a row value the template cannot handle (e.g. int + str)
                raise RowError(f"prompt template: {type(e).__name__}: {e}") from None
        else:
            column = self.prompt_column or "prompt"
            if column not in fields:
                raise RowError(f"missing field {column!r}")
            text = fields[column]
            if text is None:
                raise RowError(f"field {column!r} is null")
            if not isinstance(text, str):
                raise RowError(f"field {column!r} is not a string ({type(text).__name__})")
        if not text.strip():
            raise RowError("empty prompt")
        return text

    def encode_text(self, text: str) -> list[int]:
        if self.is_chat:
            messages = [{"role": "user", "content": text}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
            return self.encode_messages(messages)
        if self.system:
            text = f"{self.system}\n\n{text}"
        return list(self.tokenizer(text)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        """A raw prompt (no chat template, no system prompt), e.g. OpenAI /v1/completions."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_messages(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:
            raise RowError(f"chat template: {type(e).__name__}: {e}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_row(self, fields: dict[str, Any]) -> list[int]:
        return self.encode_text(self.prompt_text(fields))
