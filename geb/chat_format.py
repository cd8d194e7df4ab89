"""Chat prompt formats for imported tokenizers that do not use geb's own ChatML tokens.

geb's tokenizer renders ChatML itself (geb.tokenizer.Tokenizer.render_chat). A model imported from
elsewhere (the released GEB-1.3B with ChatGLM3's vocabulary, a Llama from Hugging Face) may need another
format; a `ChatFormat` describes it with three strings, and `render` turns messages into (ids, loss_mask)
under the same rules as ChatML: special tokens come only from the format's own strings (message text
cannot inject them), the loss mask covers assistant content plus the first special token after it (the
end-of-turn marker the model must learn to emit), and `jinja()` gives the equivalent `chat_template`
for transformers and GGUF.

The format is stored as `geb_chat_format` in tokenizer_config.json. A model imported with its own Jinja
`chat_template` (a GGUF's tokenizer.chat_template, a Hugging Face tokenizer_config.json) keeps it, and
`render_template` renders it under the same rules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geb.errors import GebError


@dataclass(frozen=True)
class ChatFormat:
    name: str
    message: str  # one message; "{role}" and "{content}" are replaced
    generation: str  # appended when the assistant is to answer
    prefix: str = ""  # once, before the first message
    eos: str = ""  # end-of-document token (what pretraining appends)
    stop: tuple[str, ...] = field(default_factory=tuple)  # tokens that end an assistant turn

    def __post_init__(self) -> None:
        if self.message.count("{content}") != 1:
            raise GebError(f"chat format '{self.name}': field 'message' must contain '{{content}}' exactly once")
        if "{content}" in self.prefix + self.generation:
            raise GebError(f"chat format '{self.name}': '{{content}}' may appear only in 'message'")
        object.__setattr__(self, "stop", tuple(self.stop))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "chat format") -> "ChatFormat":
        if not isinstance(d, dict):
            raise GebError(f"{source}: a chat format must be a JSON object")
        known = {"name", "message", "generation", "prefix", "eos", "stop"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GebError(f"{source}: unknown chat format field(s): {', '.join(unknown)}")
        for k in ("message", "generation"):
            if not isinstance(d.get(k), str):
                raise GebError(f"{source}: chat format field '{k}' must be a string")
        stop = d.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise GebError(f"{source}: chat format field 'stop' must be a list of strings")
        return cls(name=str(d.get("name", "custom")), message=d["message"], generation=d["generation"],
                   prefix=str(d.get("prefix", "")), eos=str(d.get("eos", "")), stop=tuple(stop))

    def jinja(self) -> str:
        """The equivalent Hugging Face chat_template."""
        def lit(s: str) -> str:
            parts = [json.dumps(p, ensure_ascii=False) for p in s.split("{role}")]
            return " + message['role'] + ".join(parts)

        before, after = self.message.split("{content}")
        t = "{{ " + json.dumps(self.prefix, ensure_ascii=False) + " }}" if self.prefix else ""
        t += ("{% for message in messages %}{{ " + lit(before) + " + message['content'] + " + lit(after)
              + " }}{% endfor %}")
        t += "{% if add_generation_prompt %}{{ " + json.dumps(self.generation, ensure_ascii=False) + " }}{% endif %}"
        return t


PRESETS: dict[str, ChatFormat] = {
    "chatml": ChatFormat("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
                         eos="<|endoftext|>", stop=("<|im_end|>", "<|endoftext|>")),
    # ChatGLM3's layout spelled with the GEB-1.3B release's special tokens (GEB-1.3B shares ChatGLM3's
    # vocabulary; whether it shares this format is not known, so it is only the default guess).
    "chatglm3": ChatFormat("chatglm3", "<|{role}|>\n{content}", "<|assistant|>", prefix="[gMASK]<sop>",
                           eos="<eod>", stop=("<|user|>", "<|observation|>", "<eod>")),
    # No special tokens at all: for base models.
    "plain": ChatFormat("plain", "{role}: {content}\n\n", "assistant:", eos="", stop=()),
}


def resolve(spec: str | dict | ChatFormat | None, source: str = "--chat-format") -> ChatFormat | None:
    """A preset name, a JSON file path, a dict or a ChatFormat → ChatFormat (None stays None)."""
    if spec is None or isinstance(spec, ChatFormat):
        return spec
    if isinstance(spec, dict):
        return ChatFormat.from_dict(spec, source)
    if spec in PRESETS:
        return PRESETS[spec]
    p = Path(spec)
    if p.is_file():
        try:
            return ChatFormat.from_dict(json.loads(p.read_text(encoding="utf-8")), str(p))
        except json.JSONDecodeError as e:
            raise GebError(f"{p}: not valid JSON ({e})") from None
    raise GebError(f"{source}: {spec!r} is neither a chat format preset ({', '.join(PRESETS)}) nor a JSON file")


def _special_splitter(hf_tok):
    """Special-token strings of a `tokenizers` object, longest first (so '<|im_end|>' beats '<|im')."""
    specials = {t.content: i for i, t in hf_tok.get_added_tokens_decoder().items() if t.special}
    return specials, sorted(specials, key=len, reverse=True)


def message_parts(i: int, m, roles) -> tuple[str, str]:
    """(role, content) of message `i` of a chat, or a GebError saying what is wrong with it."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise GebError(f"message {i}: expected an object with 'role' and 'content'")
    role, content = m["role"], m["content"]
    if role not in roles:
        raise GebError(f"message {i}: unknown role {role!r} (expected one of {', '.join(roles)})")
    if not isinstance(content, str):
        raise GebError(f"message {i}: 'content' must be a string")
    return role, content


def render(fmt: ChatFormat, hf_tok, messages: list[dict], add_generation_prompt: bool, roles) -> tuple[list[int], list[int]]:
    specials, ordered = _special_splitter(hf_tok)
    # pieces: (text, is_content, trains)
    pieces: list[tuple[str, bool, bool]] = [(fmt.prefix, False, False)]
    for i, m in enumerate(messages):
        role, content = message_parts(i, m, roles)
        before, after = fmt.message.split("{content}")
        pieces += [(before.replace("{role}", role), False, False), (content, True, role == "assistant"),
                   (after.replace("{role}", role), False, False)]
    if add_generation_prompt:
        pieces.append((fmt.generation, False, False))
    return encode_pieces(hf_tok, pieces)


# Stand-ins for message contents while a Jinja template renders (Unicode private-use characters, which no
# template produces): the text between them is the template's own, and only there can special tokens arise.
_OPEN, _CLOSE = "\ue000", "\ue001"


def render_template(template: str, hf_tok, messages: list[dict], add_generation_prompt: bool, roles,
                    bos_token: str = "", eos_token: str = "", source: str = "chat_template") -> tuple[list[int], list[int]]:
    """A Hugging Face Jinja `chat_template` (the model's own, as transformers and llama.cpp render it) →
    (ids, loss_mask) under the same rules as `render`.

    The template is rendered once with each message's content replaced by a marker, which splits the text
    into template pieces and contents; a second rendering with the real contents must give the same text,
    so a template that alters contents (e.g. trims them) is refused rather than silently misrendered.
    """
    import re

    for i, m in enumerate(messages):
        message_parts(i, m, roles)
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GebError(f"{source}: rendering this model's chat template needs jinja2 (pip install jinja2)") from None

    def fail(msg):
        raise GebError(f"{source}: chat template error: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    try:
        tpl = env.from_string(template)

        def text(msgs):
            return tpl.render(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                              eos_token=eos_token)

        marked = text([{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)])
        real = text(messages)
    except TemplateError as e:
        raise GebError(f"{source}: chat template cannot be rendered ({type(e).__name__}: {e})") from None
    parts = re.split(f"{_OPEN}(\\d+){_CLOSE}", marked)
    order = [int(x) for x in parts[1::2]]
    pieces: list[tuple[str, bool, bool]] = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            pieces.append((part, False, False))
        else:
            m = messages[int(part)]
            pieces.append((m["content"], True, m["role"] == "assistant"))
    if order != list(range(len(messages))) or "".join(p for p, _, _ in pieces) != real:
        raise GebError(f"{source}: the chat template does not insert each message's content once, unchanged and "
                       "in order; geb cannot tell template text from message text with it")
    return encode_pieces(hf_tok, pieces)


def encode_pieces(hf_tok, pieces: list[tuple[str, bool, bool]]) -> tuple[list[int], list[int]]:
    """(text, is_content, trains) pieces → (ids, loss_mask): special tokens only from non-content text; the
    mask covers trained content and the first special token after it (the end-of-turn marker)."""
    specials, ordered = _special_splitter(hf_tok)
    ids: list[int] = []
    mask: list[int] = []
    run, spans = "", []  # plain text waiting to be encoded; (start, end) of assistant content in it
    pending_end = False  # an assistant turn ended: its first following special token is trained

    def flush():
        nonlocal run, spans
        if not run:
            return
        hf_tok.encode_special_tokens = True
        try:
            enc = hf_tok.encode(run, add_special_tokens=False)
        finally:
            hf_tok.encode_special_tokens = False
        for tid, (s, e) in zip(enc.ids, enc.offsets):
            ids.append(tid)
            mask.append(1 if any(e > cs and s < ce for cs, ce in spans) else 0)
        run, spans = "", []

    for text, is_content, trains in pieces:
        if is_content:
            if trains:
                spans.append((len(run), len(run) + len(text)))
            run += text
            pending_end = trains
            continue
        pos = 0
        while pos < len(text):
            # the earliest special token from pos (ties: the longest)
            cands = [(text.find(s, pos), -len(s), s) for s in ordered if text.find(s, pos) >= 0]
            if not cands:
                run += text[pos:]
                break
            at, _, tok = min(cands)
            run += text[pos:at]
            flush()
            ids.append(specials[tok])
            mask.append(1 if pending_end else 0)
            pending_end = False
            pos = at + len(tok)
    flush()
    return ids, mask
