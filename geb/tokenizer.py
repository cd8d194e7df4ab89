"""The bilingual tokenizer: train/load a byte-level BPE (Hugging Face `tokenizers`) and the chat format.

Pre-tokenization uses the Qwen2 split pattern (digits one by one, CJK runs kept together, byte-level
fallback), which llama.cpp implements natively as the `qwen2` pre-tokenizer, so GGUF exports tokenize
identically. Any Unicode string round-trips exactly: there is no normaliser and every byte has a token.

The chat template of a model folder lives in one place, tokenizer_config.json's `chat_template`:
`Tokenizer.load` reads it and `render_chat` is the only place that turns messages into ids (SFT, DPO,
chat, the server and evaluation all call it; the HF and GGUF exports copy the same template). geb's own
tokenizers use ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), rendered directly; imported tokenizers
without ChatML tokens carry a `geb.chat_format.ChatFormat` (stored as `geb_chat_format`); an imported
model's own Jinja template (e.g. with a default system prompt) is rendered with jinja2.

The special ids are defined here once (`_special_ids`):
- `eos_id`: the end of a turn / of generation, the `eos_token` of tokenizer_config.json (and the GGUF
  and HF exports' eos); generation stops at `stop_ids`, which start with it.
- `bos_id`: the tokenizer's `bos_token` if it has one (geb's own: `<|endoftext|>`).
- `doc_id`: document start and separator (what pretraining data puts between documents, what
  perplexity and scoring condition the first token on): `bos_id` if there is one, else `eos_id`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from geb.chat_format import message_parts
from geb.errors import GebError

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
ROLES = ("system", "user", "assistant")

# Qwen2's pre-tokenizer pattern (also llama.cpp's "qwen2" pre-tokenizer).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _build_empty():
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A geb tokenizer: a `tokenizers.Tokenizer` plus the ids and chat template geb needs.

    `chat_template`, `bos` and `eos` (token strings) come from tokenizer_config.json or an imported
    model; None means the default of the chat format (geb's ChatML: bos `<|endoftext|>`, eos `<|im_end|>`).
    """

    def __init__(self, hf_tokenizer, source: str = "<memory>", chat_format=None, chat_template: str | None = None,
                 bos: str | None = None, eos: str | None = None):
        self._tok = hf_tokenizer
        self.source = source
        self.chat_format = chat_format  # None: geb's ChatML; else a geb.chat_format.ChatFormat
        self._special_ids(chat_template, bos, eos)

    def _tid(self, token: str, what: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise GebError(f"{self.source}: {what} names token {token!r}, which the tokenizer lacks")
        return i

    def _special_ids(self, chat_template, bos, eos) -> None:
        """The one definition of the chat template and of eos / bos / document start (see the module doc)."""
        fmt = self.chat_format
        if fmt is not None:
            for t in ([fmt.eos] if fmt.eos else []) + list(fmt.stop):
                self._tid(t, f"chat format '{fmt.name}'")
            stops = list(fmt.stop)
            default_template, default_bos = fmt.jinja(), fmt.eos or None
            default_eos = stops[0] if stops else (fmt.eos or None)
        else:
            missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
            # ChatML's tokens are needed only to render ChatML and as default bos/eos.
            if missing and (chat_template in (None, CHAT_TEMPLATE) or eos is None):
                raise GebError(f"{self.source}: tokenizer lacks the special token(s) {', '.join(missing)}")
            # ChatML's end-of-turn and end-of-text stop generation too whenever the vocabulary has them
            stops = [t for t in dict.fromkeys((eos or IM_END, IM_END, EOS)) if self._tok.token_to_id(t) is not None]
            default_template, default_bos, default_eos = CHAT_TEMPLATE, EOS, IM_END
        self.chat_template = chat_template or default_template
        eos = eos or default_eos
        bos = bos or default_bos
        # A format without an end token (e.g. "plain") has no eos; training an imported model needs one.
        self.eos_id = self._tid(eos, "eos_token") if eos else None
        self.bos_id = self._tid(bos, "bos_token") if bos else None
        self.doc_id = self.bos_id if self.bos_id is not None else self.eos_id
        stop_ids = [self._tid(t, "stop token") for t in stops]
        if self.eos_id is not None and self.eos_id not in stop_ids:
            stop_ids.insert(0, self.eos_id)
        self._stop_ids = stop_ids
        # Padding (masked wherever it is used): ChatML's <|endoftext|>, a format's end-of-document token.
        pad = EOS if fmt is None and self._tok.token_to_id(EOS) is not None else (fmt.eos if fmt is not None else "")
        self.pad_id = self._tid(pad, "pad token") if pad else self.eos_id
        self.im_start_id = self._tok.token_to_id(IM_START)
        self.im_end_id = self._tok.token_to_id(IM_END) if fmt is None else self.eos_id

    # -- training / io ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        from tokenizers import pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise GebError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
        tok = _build_empty()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = [0]

        def counted() -> Iterator[str]:
            for t in texts:
                if t:
                    seen[0] += 1
                    yield t

        tok.train_from_iterator(counted(), trainer=trainer)
        if seen[0] == 0:
            raise GebError("tokenizer training data is empty")
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        f = path / "tokenizer.json" if path.is_dir() else path
        if not f.is_file():
            raise GebError(f"{f}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise GebError(f"{f}: not a valid tokenizer.json ({e})") from None
        fmt, tc, cfg = None, f.with_name("tokenizer_config.json"), {}
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text(encoding="utf-8"))
                spec = cfg.get("geb_chat_format")
            except (json.JSONDecodeError, AttributeError) as e:
                raise GebError(f"{tc}: not a valid JSON object ({e})") from None
            if spec is not None:
                from geb.chat_format import ChatFormat

                fmt = ChatFormat.from_dict(spec, f"{tc}: geb_chat_format")
        template = cfg.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise GebError(f"{tc}: field 'chat_template' must be a string (one template)")
        return cls(tok, source=str(f), chat_format=fmt, chat_template=template,
                   bos=token_text(cfg, "bos_token"), eos=token_text(cfg, "eos_token"))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by PreTrainedTokenizerFast)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        name = lambda i: None if i is None else self._tok.id_to_token(i)  # noqa: E731
        fmt = self.chat_format
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "pad_token": name(self.pad_id),
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END] if fmt is None and self.im_start_id is not None else [],
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": self.chat_template,
            "model_max_length": 1 << 30,
        }
        if fmt is not None:
            cfg["geb_chat_format"] = fmt.to_dict()
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # -- basic ops ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        return list(self._stop_ids)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text → ids. With allow_special=False, special-token strings in the text are plain text."""
        if not isinstance(text, str):
            raise GebError(f"tokenizer input must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GebError(f"text is not valid Unicode (lone surrogate at index {e.start})") from None
        self._tok.encode_special_tokens = not allow_special
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def hash(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    # -- chat ---------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Messages → (ids, loss_mask). The mask is 1 on assistant content and its <|im_end|>.

        Each message is encoded as `<|im_start|>` + "role\\ncontent" + `<|im_end|>` + "\\n", exactly
        the segments the Jinja template produces between special tokens, so ids equal what
        transformers' apply_chat_template + encode gives. Message text cannot inject special tokens.
        """
        fmt = self.chat_format
        if fmt is not None and self.chat_template == fmt.jinja():
            from geb.chat_format import render

            return render(fmt, self._tok, messages, add_generation_prompt, ROLES)
        if fmt is not None or self.chat_template != CHAT_TEMPLATE:
            from geb.chat_format import render_template

            name = lambda i: "" if i is None else self._tok.id_to_token(i)  # noqa: E731
            return render_template(self.chat_template, self._tok, messages, add_generation_prompt, ROLES,
                                   bos_token=name(self.bos_id), eos_token=name(self.eos_id),
                                   source=f"{self.source}: chat_template")
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(messages):
            role, content = message_parts(i, m, ROLES)
            header = f"{role}\n"
            self._tok.encode_special_tokens = True
            try:
                body = self._tok.encode(header + content, add_special_tokens=False)
            finally:
                self._tok.encode_special_tokens = False
            train = 1 if role == "assistant" else 0
            ids.append(self.im_start_id)
            mask.append(0)
            for tid, (_, end) in zip(body.ids, body.offsets):
                ids.append(tid)
                mask.append(train if end > len(header) else 0)
            ids.append(self.im_end_id)
            mask.append(train)
            nl = self._tok.encode("\n", add_special_tokens=False).ids
            ids.extend(nl)
            mask.extend([0] * len(nl))
        if add_generation_prompt:
            ids.append(self.im_start_id)
            mask.append(0)
            gp = self._tok.encode("assistant\n", add_special_tokens=False).ids
            ids.extend(gp)
            mask.extend([0] * len(gp))
        return ids, mask


def token_text(cfg: dict, key: str) -> str | None:
    """A special token named in tokenizer_config.json: a string or transformers' {"content": ...} form."""
    v = cfg.get(key)
    return v.get("content") if isinstance(v, dict) else v


def efficiency(tok: "Tokenizer", texts: list[str]) -> dict:
    """Tokens, characters and bytes in `texts`, and characters and bytes per token (higher: fewer tokens)."""
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts))
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": n_tok, "chars": chars, "bytes": nbytes,
            "chars_per_token": chars / max(n_tok, 1), "bytes_per_token": nbytes / max(n_tok, 1)}
