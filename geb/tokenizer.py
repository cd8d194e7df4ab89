"""The bilingual tokenizer: train/load a byte-level BPE (Hugging Face `tokenizers`) and the chat format.

Pre-tokenization uses the Qwen2 split pattern (digits one by one, CJK runs kept together, byte-level
fallback), which llama.cpp implements natively as the `qwen2` pre-tokenizer, so GGUF exports tokenize
identically. Any Unicode string round-trips exactly: there is no normaliser and every byte has a token.

The chat format is ChatML (`<|im_start|>role\\n...<|im_end|>\\n`). `render_chat` is the only place
that turns messages into ids; SFT, DPO, chat, the server and evaluation all call it, and the same
format is stored as a Jinja `chat_template` in tokenizer_config.json for transformers and GGUF.
Imported tokenizers without ChatML tokens carry a `geb.chat_format.ChatFormat` instead (stored as
`geb_chat_format` in tokenizer_config.json); render_chat then follows it.
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
    """A geb tokenizer: a `tokenizers.Tokenizer` plus the ids and chat format geb needs."""

    def __init__(self, hf_tokenizer, source: str = "<memory>", chat_format=None):
        self._tok = hf_tokenizer
        self.source = source
        self.chat_format = chat_format  # None: geb's ChatML below; else a geb.chat_format.ChatFormat
        if chat_format is not None:
            self._init_chat_format(chat_format)
            return
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise GebError(f"{source}: tokenizer lacks the special token(s) {', '.join(missing)}")
        self.eos_id = hf_tokenizer.token_to_id(EOS)
        self.im_start_id = hf_tokenizer.token_to_id(IM_START)
        self.im_end_id = hf_tokenizer.token_to_id(IM_END)
        self._stop_ids = [self.im_end_id, self.eos_id]

    def _init_chat_format(self, fmt) -> None:
        ids = {}
        for t in ([fmt.eos] if fmt.eos else []) + list(fmt.stop):
            ids[t] = self._tok.token_to_id(t)
            if ids[t] is None:
                raise GebError(f"{self.source}: chat format '{fmt.name}' names token {t!r}, which the tokenizer lacks")
        self._stop_ids = [ids[t] for t in fmt.stop]
        # A format without an end-of-document token (e.g. "plain") falls back to its first stop token;
        # training an imported model needs one of the two.
        self.eos_id = ids[fmt.eos] if fmt.eos else (self._stop_ids[0] if self._stop_ids else None)
        self.im_start_id = self._tok.token_to_id(IM_START)
        self.im_end_id = self._stop_ids[0] if self._stop_ids else None

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
        fmt = None
        tc = f.with_name("tokenizer_config.json")
        if tc.is_file():
            try:
                spec = json.loads(tc.read_text(encoding="utf-8")).get("geb_chat_format")
            except (json.JSONDecodeError, AttributeError) as e:
                raise GebError(f"{tc}: not a valid JSON object ({e})") from None
            if spec is not None:
                from geb.chat_format import ChatFormat

                fmt = ChatFormat.from_dict(spec, f"{tc}: geb_chat_format")
        return cls(tok, source=str(f), chat_format=fmt)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by PreTrainedTokenizerFast)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": EOS,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": 1 << 30,
        }
        fmt = self.chat_format
        if fmt is not None:
            end = fmt.stop[0] if fmt.stop else (fmt.eos or None)
            cfg.update(eos_token=end, pad_token=fmt.eos or end, additional_special_tokens=[],
                       chat_template=fmt.jinja(), geb_chat_format=fmt.to_dict())
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
        if self.chat_format is not None:
            from geb.chat_format import render

            return render(self.chat_format, self._tok, messages, add_generation_prompt, ROLES)
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


def efficiency(tok: "Tokenizer", texts: list[str]) -> dict:
    """Tokens, characters and bytes in `texts`, and characters and bytes per token (higher: fewer tokens)."""
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts))
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": n_tok, "chars": chars, "bytes": nbytes,
            "chars_per_token": chars / max(n_tok, 1), "bytes_per_token": nbytes / max(n_tok, 1)}
