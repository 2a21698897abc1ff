"""One conversation format: how messages become token ids, for every trainer, rollout, scorer and server.

Everything Beaver feeds a model goes through the tokenizer's own chat template, rendered to text and
tokenised with ``add_special_tokens=False`` — exactly what ``tokenizer.apply_chat_template(...,
tokenize=True)`` does — so the template alone decides BOS, role headers, whitespace and how a turn
ends, and plain ``transformers`` reproduces Beaver's ids:

    prompt ids          apply_chat_template(messages, add_generation_prompt=True)
    conversation ids    apply_chat_template(messages + [assistant answer])      (SFT, DPO, reward/cost)
    rollout score ids   prompt ids + sampled content ids + the template's turn close  (PPO, same tokenizer)

A tokenizer without a template gets the Safe RLHF template (``BEGINNING OF CONVERSATION: USER: …
ASSISTANT: …``) written into it as a real ``chat_template``; saved with the artifact, every trained
model then carries its format.

What a template writes around an answer is read off the template once, by rendering a probe
conversation (``ChatFormat.__post_init__``):

    <generation prompt> + content_prefix + CONTENT + turn_close + turn_suffix
    e.g. ChatML:  '<|im_start|>assistant\\n' + '' + CONTENT + '<|im_end|>' + '\\n'
         Safe RLHF: '… ASSISTANT:' + ' ' + CONTENT + '</s>' + ''

``turn_close`` ends with the token that stops generation; it is added to ``eos_ids`` with every id
of ``generation_config.eos_token_id``, so a model stops wherever its format says a turn ends.

Two families write an answer differently when it is stored than when it is generated, and are
supported as such:

- Reasoning models (DeepSeek-R1 and its distills): the generation prompt writes more than a stored
  turn's header — ``<｜Assistant｜><think>\\n`` where a stored turn has ``<｜Assistant｜>`` — and
  a stored turn keeps only what follows ``</think>``. That extra text (``generation_extra``) is
  part of what the policy writes: an answer's text starts with it (``response_text``), and a score
  model reads the conversation the template stores for that text (the answer after its reasoning),
  never the rollout's own ids.
- Templates that move a message (Mistral v3 puts the system message into the *last* user turn,
  so it is in a prompt but dropped from a conversation that ends with an answer): assistant turns
  are located in the conversation's own rendering (``conversation``), not by rendering its
  prefixes, so the ids stay those of ``apply_chat_template(messages)``.

A template that refuses a conversation (Gemma's ``raise_exception('System role not supported')``)
raises ``TemplateRefused`` (a ``ValueError``) naming the message, from ``render``, the one place
templates run.

A score model reads its answer, always. A conversation longer than a score model's ``max_length``
keeps the template's head (``head_ids``: what the template writes before the first message — BOS,
a default system block) and the whole answer turn (its header, the content, the turn close and
suffix), and loses the conversation between them from the left, oldest tokens first
(``ChatFormat.fit``). Where head and answer turn alone do not fit, ``AnswerTooLong`` is raised: the
callers answer 422 or skip the pair and count it, never score a conversation without its answer.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
Prompt = str | Messages  # a user message, or a conversation that ends with a user turn

ROLES = ("system", "user", "assistant")
_PROBE_USER, _PROBE_ANSWER, _PROBE_SECOND = "PROBEUSER", "PROBEANSWER", "PROBESECOND"
_SENTINEL = "BEAVERANSWERSENTINEL"  # an assistant turn's stand-in, to find where the template writes it


class TemplateRefused(ValueError):
    """The chat template raised on a conversation (``raise_exception`` in the template, e.g. Gemma's
    "System role not supported" or a check of the role order). ``reason`` is the template's own
    message; ``index`` the first message the template refuses (the shortest refused prefix of the
    conversation ends with it; None when only the whole conversation is refused); ``field`` is
    "role" when that message is refused whatever its content, else "content"."""

    def __init__(self, reason: str, index: int | None = None, field: str | None = None, role: str | None = None):
        where = f" (message {index}, {role!r})" if index is not None else ""
        super().__init__(f"the model's chat template refuses this conversation: {reason}{where}")
        self.reason, self.index, self.field = reason, index, field
        self.pair: int | None = None  # set by a scorer: which of the (prompt, response) pairs it is

    def param(self, messages: str = "messages") -> str:
        """Where the refused message is, in a request that holds the conversation at ``messages``."""
        return messages if self.index is None else f"{messages}.{self.index}.{self.field}"


class AnswerTooLong(ValueError):
    """A conversation whose answer does not fit the tokens a model reads, even with every token of
    the prompt cut: ``needed`` = the template's head + the whole answer turn."""

    def __init__(self, needed: int, max_length: int):
        super().__init__(f"the answer alone is {needed} tokens (with the chat template's head and the answer turn's "
                         f"header and close); the model reads at most {max_length}")
        self.needed, self.max_length = needed, max_length


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def safe_rlhf_template(bos: bool) -> str:
    """The Safe RLHF reference format as a Jinja chat template. ``bos``: write the BOS token first,
    for tokenizers that add one on every encode (the template replaces that encode-time BOS)."""
    return (
        ("{{ bos_token }}" if bos else "")
        + "BEGINNING OF CONVERSATION:"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ ' SYSTEM: ' + message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    )


def as_messages(prompt: Prompt) -> Messages:
    """A prompt as chat messages: a string is one user turn; a list is checked and copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: string}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages:
        raise ValueError("a conversation needs at least one message")
    return messages


def prompt_text(prompt: Prompt) -> str:
    """The last user message of a prompt (what a rule-based scorer or a person reads)."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _eos_ids_from_files(path: Path) -> list[int]:
    """Every ``eos_token_id`` in ``generation_config.json`` and ``config.json`` (int or list)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if not file.is_file():
            continue
        value = json.loads(file.read_text()).get("eos_token_id")
        ids += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    return ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass
class ChatFormat:
    """A tokenizer with its chat template and stop ids: the one place conversations become ids."""

    tokenizer: Any
    eos_ids: tuple[int, ...] = ()
    """Ids that end generation (``generation_config.eos_token_id``, the tokenizer's eos, the turn close)."""
    template_source: str = "model"
    """"model" (the tokenizer's own), "safe-rlhf" (written by Beaver) or "job" (a job's override)."""
    content_prefix: str = field(init=False, default="")
    generation_extra: str = field(init=False, default="")
    """Text the generation prompt writes beyond a stored turn's header (R1's ``<think>\\n``): the start
    of every generated answer; "" for most formats."""
    turn_close: tuple[int, ...] = field(init=False, default=())
    turn_suffix: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self):
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("ChatFormat needs a tokenizer with a chat_template (use ChatFormat.load)")
        user = [{"role": "user", "content": _PROBE_USER}]
        generation_prompt = self.render(user, add_generation_prompt=True)
        full = self.render(user + [{"role": "assistant", "content": _PROBE_ANSWER}])
        # The stored turn's header is what the two renderings share; past it the generation prompt
        # may write more (a reasoning model's "<think>\n") and the stored turn writes the answer.
        head = os.path.commonprefix([generation_prompt, full])
        after = full[len(head):]
        if _PROBE_ANSWER not in after:
            raise ValueError("the chat template writes no assistant answer after the conversation it prompts with; "
                             "Beaver cannot line up prompts and answers with it")
        self.content_prefix = after[: after.index(_PROBE_ANSWER)]
        self.generation_extra = generation_prompt[len(head):]
        if not self.generation_extra:  # a rollout is scored as prompt ids + sampled ids: they must line up
            prompt_ids = self.encode(generation_prompt)
            if self.encode(full)[: len(prompt_ids)] != prompt_ids:
                raise ValueError("the chat template's generation prompt does not tokenise as the start of the "
                                 "conversation it prompts for; Beaver cannot line up prompts and answers with it")
        rest = self.encode(after[after.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):])
        eos = set(self.eos_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
        special = set(tok.all_special_ids)
        # The turn closes at its first eos id; failing that, at the last special token the template writes.
        close = next((i for i, t in enumerate(rest) if t in eos), None)
        if close is None:
            close = max((i for i, t in enumerate(rest) if t in special), default=None)
        if close is None:
            raise ValueError("the chat template does not end an assistant turn with an end-of-sequence or special "
                             "token, so generation could never stop where a turn ends")
        self.turn_close, self.turn_suffix = tuple(rest[: close + 1]), tuple(rest[close + 1:])
        self.eos_ids = tuple(dict.fromkeys([*self.eos_ids, *sorted(eos), rest[close]]))
        self.conversation(user + [{"role": "assistant", "content": _PROBE_ANSWER}])  # its answer can be located

    @functools.cached_property
    def system_role(self) -> str:
        """What the template does with a system message: "kept" (in prompts and in conversations
        that end with an answer), "prompt-only" (in a prompt, dropped from a conversation that ends
        with an answer: Mistral v3 puts it in the *last* user turn), "refused" (Gemma's template
        raises on it) or "dropped" (never written)."""
        system, user = {"role": "system", "content": _SENTINEL}, {"role": "user", "content": _PROBE_USER}
        try:
            prompt = self.render([system, user], add_generation_prompt=True)
            stored = self.render([system, user, {"role": "assistant", "content": _PROBE_ANSWER}])
        except TemplateRefused:
            return "refused"
        return "kept" if _SENTINEL in stored else "prompt-only" if _SENTINEL in prompt else "dropped"

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, chat_template: str | None = None, padding_side: str = "right") -> "ChatFormat":
        """The format of a local Hugging Face directory: its tokenizer (a ``chat_template`` given
        here overrides the model's; none at all → the Safe RLHF template) and its eos ids. A
        tokenizer without a pad token pads with its eos (padding is always masked)."""
        from transformers import AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokenizer.padding_side = padding_side
        if tokenizer.eos_token is None:  # the Safe RLHF template ends answers with it
            tokenizer.add_special_tokens({"eos_token": "</s>"})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # A template Beaver wrote into an earlier artifact is still Beaver's Safe RLHF template.
        source = "safe-rlhf" if tokenizer.chat_template in (safe_rlhf_template(True), safe_rlhf_template(False)) \
            else "model"
        if chat_template:
            tokenizer.chat_template, source = chat_template, "job"
        elif not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template, source = safe_rlhf_template(_adds_bos(tokenizer)), "safe-rlhf"
        return cls(tokenizer, tuple(_eos_ids_from_files(path)), source)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer (with its chat template) and make ``generation_config.json`` list
        every eos id, so plain transformers and vLLM stop where Beaver does."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        config_file = path / "generation_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        config["eos_token_id"] = list(self.eos_ids)
        if self.tokenizer.pad_token_id is not None:
            config.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        config_file.write_text(json.dumps(config, indent=2) + "\n")

    def info(self) -> dict:
        """What a job records about the format it trained with."""
        import hashlib

        template = self.tokenizer.chat_template
        return {"chat_template": self.template_source,
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}

    def same_as(self, other: "ChatFormat") -> bool:
        """Whether ids of one format mean the same conversation in the other: same template and the
        same vocabulary (a pad token one of them added aside)."""
        a, b = self.tokenizer.get_vocab(), other.tokenizer.get_vocab()
        for tok, vocab, theirs in ((self.tokenizer, a, b), (other.tokenizer, b, a)):
            if tok.pad_token not in theirs:  # a pad token one side added never reaches the other
                vocab.pop(tok.pad_token, None)
        return (self.tokenizer.chat_template == other.tokenizer.chat_template and a == b
                and (self.turn_close, self.turn_suffix) == (other.turn_close, other.turn_suffix))

    # -- rendering ----------------------------------------------------------------------------------

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The template's text of ``messages``; a template that refuses them raises ``TemplateRefused``."""
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateSyntaxError as e:
            raise ValueError(f"the chat template is not valid Jinja: {e}") from None
        except TemplateError as e:
            raise self._refusal(messages, str(e)) from None

    def _refusal(self, messages: Messages, reason: str) -> TemplateRefused:
        """Which message the template refuses: the last of the shortest prefix it refuses (only
        rendered on the error path)."""
        from jinja2 import TemplateError

        def refused(conversation) -> bool:
            try:
                self.tokenizer.apply_chat_template(conversation, tokenize=False)
            except TemplateError:
                return True
            return False

        for k in range(1, len(messages) + 1):
            if refused(messages[:k]):
                message = messages[k - 1]
                whatever_content = refused(messages[: k - 1] + [{**message, "content": "x"}])
                return TemplateRefused(reason, k - 1, "role" if whatever_content else "content", message.get("role"))
        return TemplateRefused(reason)

    def encode(self, text: str) -> list[int]:
        # The template writes every special token itself (BOS included): never add them again.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Ids a policy continues: the conversation and the template's generation prompt."""
        return self.encode(self.render(as_messages(prompt), add_generation_prompt=True))

    def completion_ids(self, prompt: Prompt, response: str, max_length: int | None = None) -> list[int]:
        """Ids of the conversation ``prompt`` + the assistant's ``response``: what a reward or cost
        model reads (its end score sits on the last id). A longer one than ``max_length`` is cut by
        ``fit``: head and answer kept, the prompt cut from the left; ``AnswerTooLong`` when even
        the answer does not fit."""
        messages = as_messages(prompt)
        ids = self.encode(self.render(messages + [{"role": "assistant", "content": response}]))
        if max_length is None or len(ids) <= max_length:
            return ids
        return self.fit(ids, _common_prefix(self.encode(self.render(messages)), ids), max_length)

    def answer_ids(self, prompt: Prompt, response: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """``completion_ids`` and its mask: 1 on the answer's content and turn close (what DPO
        scores, as SFT's mask marks an assistant turn), 0 on the prompt and the template's text."""
        messages = as_messages(prompt)
        full, mask = self.conversation(messages + [{"role": "assistant", "content": response}])
        start = len(mask) - len(self.turn_suffix)  # the answer: the last run of ones (earlier turns are prompt)
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [0] * start + mask[start:]
        if max_length is None or len(full) <= max_length:
            return full, mask
        ids = self.fit(full, _common_prefix(self.encode(self.render(messages)), full), max_length)
        cut = len(full) - len(ids)  # tokens removed, all of them before the answer turn
        return ids, [0] * (start - cut) + mask[start:]

    def fit(self, ids: Sequence[int], turn_start: int, max_length: int | None) -> list[int]:
        """``ids`` of a conversation whose answer turn starts at ``turn_start``, within
        ``max_length`` for a model that must read the answer: the template's head and the whole
        answer turn are kept, the conversation between them is cut from the left (its oldest tokens
        go first). Raises ``AnswerTooLong`` when head and answer turn alone are longer."""
        ids = [int(t) for t in ids]
        if max_length is None or len(ids) <= max_length:
            return ids
        head = _common_prefix(self.head_ids, ids[:turn_start])  # a system message may replace a default one
        turn = ids[turn_start:]
        room = max_length - head - len(turn)
        if room < 0:
            raise AnswerTooLong(head + len(turn), max_length)
        return ids[:head] + ids[turn_start - room: turn_start] + turn

    @functools.cached_property
    def head_ids(self) -> tuple[int, ...]:
        """What the template writes before the first message (BOS, a default system block), read
        off probes: the text before the first user message's header, where that header is the one
        the template writes for a later user message. Empty when the two headers differ."""
        user = [{"role": "user", "content": _PROBE_USER}]
        turn = user + [{"role": "assistant", "content": _PROBE_ANSWER}]
        first, before = self.render(user), self.render(turn)
        after = self.render(turn + [{"role": "user", "content": _PROBE_SECOND}])
        if not after.startswith(before) or _PROBE_SECOND not in after[len(before):]:
            return ()
        header = after[len(before): after.index(_PROBE_SECOND, len(before))]
        start = first.index(_PROBE_USER)
        if not first[:start].endswith(header):
            return ()
        head = first[: start - len(header)]
        return tuple(self.encode(head)) if head else ()

    @functools.cached_property
    def generation_header(self) -> tuple[int, ...]:
        """The ids the generation prompt adds after a conversation (``<|im_start|>assistant\\n``,
        Safe RLHF's `` ASSISTANT:``): the header of the answer turn, kept with the answer."""
        user = [{"role": "user", "content": _PROBE_USER}]
        plain, prompt = self.encode(self.render(user)), self.encode(self.render(user, add_generation_prompt=True))
        return tuple(prompt[_common_prefix(plain, prompt):])

    def conversation(self, messages: Messages, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation — exactly ``apply_chat_template(messages, tokenize=True)`` — and
        its assistant mask (1 on every assistant turn's content and turn close — what SFT learns to
        write, including where to stop — 0 elsewhere).

        Each answer is located in the conversation's own text: rendered once more with a sentinel for
        that answer, the text before and after the sentinel is the text before and after the answer
        (whatever the template does to it: trim it, drop a reasoning part), and the fast tokenizer's
        offsets map that span to tokens. Templates that render a prefix of the conversation
        differently from the whole (Mistral's system message in the last user turn) are fine; a span
        that does not fall on token boundaries is an error, never a silent mask.
        """
        messages = as_messages(messages)
        text = self.render(messages)
        try:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ValueError("Beaver needs a fast tokenizer (tokenizer.json) to locate assistant turns") from None
        ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
        close = list(self.turn_close)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self._answer_span(messages, i, text)
            header_end = start - len(self.content_prefix)
            if text[header_end:start] != self.content_prefix:
                raise ValueError(f"the chat template writes assistant message {i} without the text it puts before "
                                 f"every answer ({self.content_prefix!r}), so its tokens cannot be located")
            first = _token_from(offsets, header_end, i)
            after = _token_from(offsets, end, i)
            if ids[after: after + len(close)] != close:
                raise ValueError(f"the chat template does not close assistant message {i} with its turn close, so "
                                 "what the model learns to stop with cannot be located")
            mask[first: after + len(close)] = [1] * (after + len(close) - first)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        return ids, mask

    def _answer_span(self, messages: Messages, i: int, text: str) -> tuple[int, int]:
        """Character span of assistant message ``i``'s content as ``text`` (the conversation's
        rendering) holds it."""
        marked = self.render(messages[:i] + [{**messages[i], "content": _SENTINEL}] + messages[i + 1:])
        at = marked.find(_SENTINEL)
        if at < 0 or marked.count(_SENTINEL) != 1:
            raise ValueError(f"the chat template does not write assistant message {i} of the conversation, so it "
                             "cannot be trained on")
        before, after = marked[:at], marked[at + len(_SENTINEL):]
        if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
            raise ValueError(f"the chat template renders the rest of the conversation differently depending on "
                             f"assistant message {i}, so its tokens cannot be located")
        return len(before), len(text) - len(after)

    # -- rollouts -----------------------------------------------------------------------------------

    def content_ids(self, response_ids: Sequence[int]) -> list[int]:
        """A sampled response's content: its ids before the first eos id (and before a turn close
        the model wrote itself)."""
        out = []
        for t in response_ids:
            if t in self.eos_ids:
                break
            out.append(int(t))
        closing = list(self.turn_close[:-1])
        if closing and out[-len(closing):] == closing:
            out = out[: -len(closing)]
        return out

    def score_ids(self, prompt_ids: Sequence[int], response_ids: Sequence[int],
                  max_length: int | None = None) -> list[int]:
        """The conversation a score model reads for a rollout, in the rollout's own ids: prompt,
        content, then the turn close and suffix the template writes (a truncated answer is closed
        too, as re-rendering its text would); cut to ``max_length`` by ``fit``, as
        ``completion_ids`` is. Equal to ``completion_ids(prompt, text, max_length)`` whenever the
        text re-tokenises to the sampled ids."""
        prompt_ids = [int(t) for t in prompt_ids]
        ids = prompt_ids + self.content_ids(response_ids) + list(self.turn_close + self.turn_suffix)
        if max_length is None or len(ids) <= max_length:
            return ids
        header = list(self.generation_header)
        ends_with_header = bool(header) and prompt_ids[len(prompt_ids) - len(header):] == header
        return self.fit(ids, len(prompt_ids) - (len(header) if ends_with_header else 0), max_length)

    def response_text(self, response_ids: Sequence[int]) -> str:
        """The answer as a message's ``content``: the decoded content without the text the template
        itself puts before an answer (Safe RLHF's space after ``ASSISTANT:``), after the text the
        generation prompt wrote for the policy (a reasoning model's ``<think>\\n``)."""
        text = self.tokenizer.decode(self.content_ids(response_ids), skip_special_tokens=True)
        text = text[len(self.content_prefix):] if self.content_prefix and text.startswith(self.content_prefix) else text
        return self.generation_extra + text  # what the generation prompt wrote is the answer's start (R1's <think>)

    # -- score models -------------------------------------------------------------------------------

    def score_padding(self) -> None:
        """Give a score model a pad id that is not the last id of a conversation: Hugging Face's
        ``*ForSequenceClassification`` pools at the last non-pad token, so padding with that id
        would move the end score. An existing token is reused when one fits."""
        last = (self.turn_close + self.turn_suffix)[-1]
        tok = self.tokenizer
        if tok.pad_token_id != last:
            return
        for candidate in (tok.eos_token, tok.bos_token, tok.unk_token):
            if candidate is not None and tok.convert_tokens_to_ids(candidate) != last:
                tok.pad_token = candidate
                return
        tok.add_special_tokens({"pad_token": "<|pad|>"})


def _token_from(offsets, char: int, turn: int) -> int:
    """Index of the first token at or after character ``char``; no token may straddle ``char``."""
    index = next((k for k, (start, _) in enumerate(offsets) if start >= char), len(offsets))
    if index and offsets[index - 1][1] > char:
        raise ValueError(f"a token of the conversation spans the start or the end of assistant message {turn}, so "
                         "what the model writes cannot be told from the text around it")
    return index
