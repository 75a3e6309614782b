"""Tokenizer: HF `tokenizers` underneath, chat templates rendered as transformers renders them.

Two ways in:

* `Tokenizer.from_folder(path)`: a Hugging Face folder (`tokenizer.json`, plus `tokenizer_config.json`,
  `generation_config.json`, `special_tokens_map.json`, `chat_template.jinja` when present).
* `Tokenizer.from_gguf_metadata(meta)`: the `tokenizer.*` keys of a GGUF file. A GGUF carries no
  `tokenizer.json`, only the vocabulary, the merges (or scores) and a name for the pre-tokenizer, so
  the pipeline is rebuilt here the way llama.cpp runs it.

One way out: `save(folder)`, which `from_folder` and transformers' `AutoTokenizer` both read back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from llmkit.errors import LLMKitError, ModelFormatError

__all__ = ["Tokenizer", "IncrementalDecoder", "ChatTemplateError"]


class ChatTemplateError(LLMKitError):
    """A chat template that cannot be rendered: none set, malformed messages, or the template raised."""


# The special-token names transformers hands to a chat template (its `special_tokens_map`).
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# GGUF token types (llama.cpp `llama_token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------
# Byte-level alphabet (GPT-2): every byte gets a printable stand-in character, so that a BPE
# vocabulary of strings can spell any byte sequence.


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell_bytes(text: str) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers named by GGUF `tokenizer.ggml.pre`. The split rules are llama.cpp's
# (llama-vocab.cpp), which copy each model's own `tokenizer.json`.

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in taking digits one at a time.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name -> (kind, regex). kind "gpt2": GPT-2's own split; "digits": every digit alone, then GPT-2's
# split (StarCoder's tokenizer, which SmolLM reuses); "regex": the regex, then bytes.
_PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    **{name: ("gpt2", None) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2")},
    **{name: ("digits", None) for name in ("starcoder", "refact", "smollm", "codeshell", "command-r", "exaone")},
    **{
        name: ("regex", _LLAMA3_SPLIT)
        for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral")
    },
    **{name: ("regex", _QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    **{name: ("regex", _GPT4O_SPLIT) for name in ("gpt-4o", "llama4")},
}
# Llama 3's tokenizer takes a whole word from the vocabulary before trying merges (llama.cpp
# `ignore_merges`, the `"ignore_merges": true` of its tokenizer.json).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral", "llama4"}


def _byte_level_pre_tokenizer(pre: str):
    kind, regex = _PRE_TOKENIZERS[pre]
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _special_post_processor(bos: str | None, bos_id, eos: str | None, eos_id):
    """Adds BOS/EOS around a sequence when `encode(..., add_special_tokens=True)`."""
    single, pair, specials = [], [], []
    if bos is not None:
        single.append(f"{bos}:0")
        pair.append(f"{bos}:0")
        specials.append((bos, bos_id))
    single.append("$A:0")
    pair.append("$A:0")
    if eos is not None:
        single.append(f"{eos}:0")
        pair.append(f"{eos}:0")
    if bos is not None:
        pair.append(f"{bos}:1")
    pair.append("$B:1")
    if eos is not None:
        pair.append(f"{eos}:1")
        if eos != bos:
            specials.append((eos, eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _merges_from_scores(tokens: list[str], scores: list[float], mergeable: set[int]) -> list[tuple[str, str]]:
    """A SentencePiece BPE vocabulary stores no merges, only a score per piece: the higher the score,
    the earlier SentencePiece merged it. Rebuild the merge list from every split of a piece into two
    pieces that are themselves in the vocabulary, ranked by the score of the piece they make."""
    index = {tokens[i]: i for i in mergeable}
    ranked = []
    for i in mergeable:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], index[left], index[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"Cannot read {path}: {e}. Check that the file is complete and valid JSON.") from e


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, and chat templates.

    Built by `from_folder` or `from_gguf_metadata`; `backend` is the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if isinstance(chat_template, Mapping):
            self._chat_templates = dict(chat_template)
        elif chat_template is not None:
            self._chat_templates = {"default": chat_template}
        else:
            self._chat_templates = {}
        self._extra_eos = {int(i) for i in extra_eos_token_ids}
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        # transformers only cleans up spaces for non-BPE models (it corrupts BPE output).
        self._clean_up = bool(clean_up_tokenization_spaces) and type(backend.model).__name__ != "BPE"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer folder; `tokenizer.json` is required."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ModelFormatError(
                f"No tokenizer.json in {path}. llmkit reads the fast-tokenizer file; convert a slow "
                "(SentencePiece/vocab.txt) tokenizer with transformers' AutoTokenizer(...).save_pretrained first."
            )
        try:
            backend = _Backend.from_file(tokenizer_file)
        except Exception as e:  # tokenizers raises a plain Exception on a bad file
            raise ModelFormatError(f"Cannot parse {tokenizer_file}: {e}") from e

        def optional(name: str) -> dict:
            file = os.path.join(path, name)
            return _read_json(file) if os.path.isfile(file) else {}

        config = optional("tokenizer_config.json")
        special_map = optional("special_tokens_map.json")
        generation = optional("generation_config.json")

        # Added tokens the config knows and tokenizer.json does not (older exports).
        for index, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            content = spec.get("content")
            if content is None or backend.token_to_id(content) is not None:
                continue
            token = AddedToken(
                content,
                single_word=spec.get("single_word", False),
                lstrip=spec.get("lstrip", False),
                rstrip=spec.get("rstrip", False),
                normalized=spec.get("normalized", not spec.get("special", False)),
                special=spec.get("special", False),
            )
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])

        special = {}
        for name in _SPECIAL_NAMES:
            value = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if value is not None:
                special[name] = value
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extras, Mapping):  # v5 allows named extras, e.g. {"image_token": "<image>"}
            for name, value in extras.items():
                if _token_content(value) is not None:
                    special[name] = _token_content(value)
            extras = list(extras.values())
        missing = [c for c in map(_token_content, extras) if c and backend.token_to_id(c) is None]
        if missing:
            backend.add_special_tokens([AddedToken(c, normalized=False, special=True) for c in missing])

        chat_template = cls._folder_chat_template(path, config)

        # What encode(..., add_special_tokens=True) adds is the tokenizer.json post-processor's call:
        # transformers' generic fast tokenizer ignores the config's add_bos_token/add_eos_token, and so
        # do we. The flags report what the post-processor does.
        probe = backend.encode("a", add_special_tokens=True).ids
        bos = special.get("bos_token")
        eos = special.get("eos_token")
        bos_id = backend.token_to_id(bos) if bos is not None else None
        eos_id = backend.token_to_id(eos) if eos is not None else None
        add_bos = bos_id is not None and probe[:1] == [bos_id]
        add_eos = eos_id is not None and probe[-1:] == [eos_id]

        eos_ids = generation.get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        return cls(
            backend,
            special_tokens=special,
            chat_template=chat_template,
            extra_eos_token_ids=eos_ids or (),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        )

    @staticmethod
    def _folder_chat_template(path: str, config: dict):
        # Newer transformers write the template to its own file; it wins over the config's copy.
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                templates: dict[str, str] = {"default": f.read()}
            extra_dir = os.path.join(path, "additional_chat_templates")
            if os.path.isdir(extra_dir):
                for name in sorted(os.listdir(extra_dir)):
                    if name.endswith(".jinja"):
                        with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                            templates[name[: -len(".jinja")]] = f.read()
            return templates if len(templates) > 1 else templates["default"]
        template = config.get("chat_template")
        if template is None and os.path.isfile(os.path.join(path, "chat_template.json")):
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {item["name"]: item["template"] for item in template}
        return template

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, chat_template: str | None = None,
                           end_of_turn: Iterable[str] = ()) -> Tokenizer:
        """Build the tokenizer a GGUF file describes.

        `meta` maps GGUF keys to values: `{key: field.contents() for key, field in GGUFReader(path).fields.items()}`.
        Supported `tokenizer.ggml.model` kinds: "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE).
        The model family's defaults, for files that lack them: `chat_template`, used when the file
        has none; `end_of_turn`, texts of tokens that end generation as EOS does (as llama.cpp
        recognises Gemma's `<end_of_turn>`).
        """
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelFormatError(
                "This GGUF file holds no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens). "
                "Pass a tokenizer folder alongside it."
            )
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]
        if len(types) != len(tokens):
            raise ModelFormatError(
                f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types; the file is damaged."
            )

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            value = int(value)
            return value if 0 <= value < len(tokens) else None

        ids = {name: token_id(key) for name, key in (
            ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"),
        )}

        if kind == "gpt2":
            backend, content = cls._gguf_byte_level(meta, tokens, types)
            add_bos_default = False
        elif kind == "llama":
            backend, content = cls._gguf_sentencepiece(meta, tokens, types, ids["unk"])
            add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to
        else:
            raise ModelFormatError(
                f"GGUF tokenizer model {kind!r} is not supported; llmkit reads 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece BPE) vocabularies. Use the model's Hugging Face tokenizer folder instead."
            )

        special = {f"{name}_token": content(i) for name, i in ids.items() if i is not None}
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        if add_bos and ids["bos"] is None:
            add_bos = False
        if add_eos and ids["eos"] is None:
            add_eos = False
        backend.post_processor = _special_post_processor(
            special.get("bos_token") if add_bos else None,
            ids["bos"],
            special.get("eos_token") if add_eos else None,
            ids["eos"],
        )

        templates = {}
        if meta.get("tokenizer.chat_template") is not None:
            templates["default"] = str(meta["tokenizer.chat_template"])
        prefix = "tokenizer.chat_template."
        for key, value in meta.items():
            if key.startswith(prefix) and key != "tokenizer.chat_templates" and value is not None:
                templates[key[len(prefix):]] = str(value)
        if not templates and chat_template is not None:
            templates["default"] = chat_template
        chat_template = templates if len(templates) > 1 or (templates and "default" not in templates) else (
            templates.get("default")
        )

        # End-of-turn tokens end generation as much as EOS does (llama.cpp's eot/eom ids).
        extra_eos = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        if end_of_turn:
            turns = set(end_of_turn)
            extra_eos += [i for i, (t, k) in enumerate(zip(tokens, types)) if t in turns and k in (_CONTROL, _USER_DEFINED)]
        return cls(
            backend,
            special_tokens=special,
            chat_template=chat_template,
            extra_eos_token_ids=extra_eos,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
        )

    @staticmethod
    def _gguf_byte_level(meta, tokens: list[str], types: list[int]):
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_TOKENIZERS:
            raise ModelFormatError(
                f"GGUF pre-tokenizer {pre!r} is not supported, so this vocabulary would split text wrongly. "
                f"Supported: {', '.join(sorted(_PRE_TOKENIZERS))}. "
                "Use the model's Hugging Face tokenizer folder instead."
            )
        alphabet = set(_byte_alphabet().values())
        vocab: dict[str, int] = {}
        added: list[AddedToken] = []
        contents: list[str] = []
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind in (_CONTROL, _USER_DEFINED):
                # llama.cpp stores added tokens as their text, not in the byte alphabet, and matches
                # them whole in the input. They enter the vocabulary under that text.
                key, content = token, token
                added.append(AddedToken(token, normalized=False, special=kind == _CONTROL))
            else:
                key = token if set(token) <= alphabet else _spell_bytes(token)
                content = token
            if key in vocab:  # a duplicate spelling: keep the first id, as llama.cpp does
                key = f"<llmkit-duplicate-{i}>"
            vocab[key] = i
            contents.append(content)
        merges = []
        for merge in meta.get("tokenizer.ggml.merges") or []:
            parts = str(merge).split(" ")
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
        try:
            model = models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES, fuse_unk=False, byte_fallback=False)
        except Exception as e:
            raise ModelFormatError(f"GGUF byte-level vocabulary and merges do not fit together: {e}") from e
        backend = _Backend(model)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        if added:
            backend.add_tokens(added)
        return backend, contents.__getitem__

    @staticmethod
    def _gguf_sentencepiece(meta, tokens: list[str], types: list[int], unk_id: int | None):
        scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or []]
        if len(scores) != len(tokens):
            raise ModelFormatError("GGUF SentencePiece vocabulary has no score per token; the file is damaged.")
        vocab = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)
        if meta.get("tokenizer.ggml.merges"):
            merges = [tuple(str(m).split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        else:
            mergeable = {i for i, k in enumerate(types) if k in (_NORMAL, _USER_DEFINED) and vocab[tokens[i]] == i}
            merges = _merges_from_scores(tokens, scores, mergeable)
        unk = tokens[unk_id] if unk_id is not None else None
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        backend = _Backend(model)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        # llama.cpp prepends the space to every run of text (also after a special token), as the
        # legacy Llama tokenizer.json normalizer does.
        steps = [normalizers.Prepend("▁")] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
        added = [
            AddedToken(t, normalized=False, special=k in (_CONTROL, _UNKNOWN))
            for t, k in zip(tokens, types)
            if k in (_CONTROL, _USER_DEFINED, _UNKNOWN)
        ]
        if added:
            backend.add_tokens(added)
        return backend, tokens.__getitem__

    # -- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text ("<|im_start|>") become their ids.
        `add_special_tokens=True` adds what the tokenizer adds around a sequence (BOS, EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        # through encode_batch: it lets go of the interpreter's lock while it works (encode holds
        # it throughout), so a long text tokenized on a worker thread does not stall the others
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel inside `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """An `IncrementalDecoder` for text that arrives one token at a time."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, spelled as the vocabulary spells it (byte-level: "Ġthe")."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens as text: {"bos_token": "<s>", "eos_token": ...}."""
        return dict(self._special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: EOS plus generation_config's (or GGUF's end-of-turn) ids."""
        ids = set(self._extra_eos)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token (added tokens marked special, and the named ones)."""
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids.update(i for i in map(self._special_id, self._special_tokens) if i is not None)
        return ids

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None."""
        return self._chat_templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every named chat template ("default", "tool_use", ...)."""
        return dict(self._chat_templates)

    # -- chat templates -----------------------------------------------------------------------

    def _pick_template(self, chat_template: str | None, tools) -> str:
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        if self._chat_templates:
            raise ChatTemplateError(
                f"This tokenizer has several chat templates and none is the default: "
                f"{sorted(self._chat_templates)}. Pass chat_template=<name or Jinja template>."
            )
        raise ChatTemplateError(
            "This tokenizer has no chat template. Pass one: apply_chat_template(messages, "
            "chat_template='{% for m in messages %}...{% endfor %}'), or use a model whose tokenizer has one."
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs,
    ) -> str | list[int]:
        """Render a conversation with the chat template, exactly as transformers renders it.

        messages: dicts with "role" and "content" ("content" may be absent when "tool_calls" is set).
        tools: JSON schemas, passed to the template as `tools`.
        chat_template: a template name ("tool_use") or a Jinja template, instead of the tokenizer's.
        continue_final_message: leave the last message open so the model continues it.
        kwargs: extra template variables (they override bos_token etc.).
        tokenize=True returns ids (special tokens recognised, nothing added) instead of text.
        """
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError(
                "add_generation_prompt and continue_final_message cannot both be set: the first starts a new "
                "assistant message, the second continues the last one."
            )
        template = self._pick_template(chat_template, tools)
        chat = _check_messages(messages)
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ChatTemplateError(
                        f"Each tool must be a JSON schema dict, got {type(tool).__name__}. "
                        'Describe it as {"type": "function", "function": {"name": ..., "parameters": ...}}.'
                    )
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        final = None
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ChatTemplateError("continue_final_message needs the last message to have text content.")
            chat[-1]["content"] = final + tag
        variables = {
            **self._special_tokens,
            **_plain(kwargs),
        }
        compiled = _compile_template(template)
        try:
            text = compiled.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                documents=_plain(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except LLMKitError:
            raise
        except Exception as e:
            import jinja2

            if isinstance(e, jinja2.TemplateError):
                raise ChatTemplateError(f"The chat template raised an error: {e}") from e
            raise ChatTemplateError(f"The chat template failed to render ({type(e).__name__}: {e}).") from e
        if continue_final_message:
            # Cut the rendered text right after the final message, dropping what the template closes it with.
            if final.strip() not in text or tag.strip() not in text:
                raise ChatTemplateError(
                    "continue_final_message: the chat template changed the final message, so it cannot be continued."
                )
            at = text.rindex(tag.strip())
            text = text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    # -- saving -------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, readable by `from_folder` and by
        transformers' `AutoTokenizer.from_pretrained`. Generation's extra EOS ids (`eos_token_ids`)
        belong in generation_config.json, which the model export writes."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": self._clean_up,
            "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
            **self._special_tokens,
        }
        templates = self._chat_templates
        if list(templates) == ["default"]:
            config["chat_template"] = templates["default"]
        elif templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")


# ---------------------------------------------------------------------------------------------
# Streaming decode


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces that never change afterwards.

    A byte-level token can end in the middle of a UTF-8 character, and some decoders change text
    at the edges (SentencePiece drops the first leading space). So each step decodes a short window:
    the tokens already emitted since the last safe point, and the new ones; it emits the difference
    once the window's text no longer ends in an incomplete character (U+FFFD). The concatenation of
    every `add` and the final `flush` equals `Tokenizer.decode` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: text before it is final
        self._read = 0  # tokens before it have been emitted

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Take one id; return the text that became final (maybe "")."""
        self._ids.append(int(token_id))
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) > len(done) and not text.endswith("\ufffd") and text.startswith(done):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end); resets the decoder."""
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._ids.clear()
        self._prefix = self._read = 0
        if text.startswith(done):
            return text[len(done):]
        return text[len(_common_prefix(done, text)):]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


# ---------------------------------------------------------------------------------------------
# Chat template support: what transformers' renderer gives a template, written for llmkit.


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError('messages must be a list of dicts like {"role": "user", "content": "..."}.')
    if not messages:
        raise ChatTemplateError("messages is empty: give at least one message.")
    chat = []
    for n, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f'Message {n} is a {type(message).__name__}; each message must be a dict like '
                '{"role": "user", "content": "..."}.'
            )
        # Keys set to None are dropped, as transformers does: templates test for a key, not for None.
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f'Message {n} has no "role" (such as "user", "assistant" or "system").')
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(f'Message {n} (role {message["role"]!r}) has no "content".')
        message = _plain(message)
        # Reasoning arrives under several names; templates read `reasoning_content` (most) or
        # `thinking` (gpt-oss). Fill both, as transformers does.
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _plain(value: Any) -> Any:
    """A copy built only of JSON-like types, so the sandboxed template sees no foreign objects and
    cannot change the caller's data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except Exception:
            pass
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Dict:
        # `dict(...)` for templates, without handing them the dict type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        # Refuse underscore attributes, the way into Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"Chat templates cannot set namespace attribute {name!r}.")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"The chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up_spaces(text: str) -> str:
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text
