"""The OpenAI-compatible request/response types of serving, in one place.

Fields follow the order of OpenAI's API reference. Beaver implements a subset, and its errors
have the shape ``{"error": {"code", "message", "param"}}``:

- 400 ``unsupported_parameter``: a field Beaver does not support (``tools``, ``logprobs: true``,
  ``n: 2`` …) or that no API knows — named in ``param``, never silently ignored; also a model of
  the wrong kind (chatting with a cost model);
- 422 ``invalid_request``: a value out of range or missing (``messages: []``, ``max_tokens: 0``);
- 404 ``model_not_found``: no round or registered model of that name;
- 413 ``payload_too_large``: more than ``MAX_SCORE_ITEMS`` pairs in one scoring request;
- 503 ``model_unavailable``: the model exists but failed to load (the reason is in the message);
  the server keeps serving the other models.

Beaver's extensions are fenced with ``# --- Beaver extension`` comments and described on the
field: end scores of the reward and cost models (``reward``, ``cost``; **safe ⇔ cost ≤ 0**), the
safety ``threshold`` of moderation and guard mode, and the models that produced them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.errors import ApiError

MAX_SCORE_ITEMS = 256  # pairs per /v1/score or /v1/moderations request; more → 413
MAX_COMPARE_MODELS = 8
SEED_BOUND = 2 ** 63  # seeds are signed 64-bit integers, as OpenAI's and vLLM's


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Request(BaseModel):
    """A request body: extra fields are collected and rejected with a 400 that names them.

    ``_defaults_only`` lists OpenAI fields Beaver accepts only at their default value (so a
    client that always sends ``n: 1`` or ``logprobs: false`` works unchanged).
    """

    model_config = ConfigDict(extra="allow")
    _defaults_only: ClassVar[dict] = {}

    @model_validator(mode="after")
    def _reject_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in self._defaults_only:
                if value in (None, self._defaults_only[name]):
                    continue
                raise ApiError(400, f"{name}={value!r} is not supported by Beaver "
                               f"(only {self._defaults_only[name]!r})", param=name, code="unsupported_parameter")
            raise ApiError(400, f"unknown or unsupported field {name!r}", param=name, code="unsupported_parameter")
        return self


# --- chat ---------------------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # images, audio and files are not supported: text-only models
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def as_prompt(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the engines read them (``developer`` is OpenAI's newer name for ``system``)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    _defaults_only: ClassVar[dict] = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "n": 1,
                      "response_format": {"type": "text"}, "tool_choice": "none", "store": False}

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1, description="A round name (its policy) or a model id.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (OpenAI's newer name).")
    max_tokens: int | None = Field(None, ge=1, description="Default: up to the model's context.")
    seed: int | None = Field(None, ge=-SEED_BOUND, lt=SEED_BOUND, description="A signed 64-bit integer.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 → greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = Field(None, description="The end user's id, for the caller's records; not used.")
    # --- Beaver extension ---
    guard: bool | None = Field(None, description="Beaver: score the answer with the round's cost model and replace "
                               "it by a refusal when cost > guard_threshold. Default: the server's setting for the "
                               "round. Streaming with a guard sends the answer in one chunk, once scored.")
    guard_threshold: float = Field(0.0, description="Beaver: the cost above which the guard refuses (safe ⇔ cost ≤ 0).")
    # --- end Beaver extension ---

    @model_validator(mode="after")
    def _check(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(422, "stop takes up to 4 non-empty strings", param="stop", code="invalid_request")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(422, "max_tokens and max_completion_tokens differ; send one", param="max_tokens",
                           code="invalid_request")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"]
    # --- Beaver extension (present when the answer was scored: guard mode, /v1/chat/compare) ---
    reward: float | None = Field(None, description="Beaver: the reward model's end score of the answer.")
    cost: float | None = Field(None, description="Beaver: the cost model's end score; safe ⇔ cost ≤ 0.")
    guarded: bool | None = Field(None, description="Beaver: true when the guard replaced an unsafe answer by a "
                                 "refusal (finish_reason is then 'content_filter').")
    # --- end Beaver extension ---


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    # --- Beaver extension: on the last chunk of a guarded stream, as in ChatChoice ---
    reward: float | None = None
    cost: float | None = None
    guarded: bool | None = None
    # --- end Beaver extension ---


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``data: {...}``; the stream ends with
    ``data: [DONE]``). With ``stream_options.include_usage`` a last chunk has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "beaver"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- Beaver: scoring --------------------------------------------------------------------------------

class PromptMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[PromptMessage] = Field(description="The user's message ('' for none), or the conversation "
                                              "before the answer: messages ending with a user message.")
    response: str = Field(description="The answer to score.")

    @field_validator("prompt")
    @classmethod
    def _ends_with_user(cls, prompt):
        if isinstance(prompt, list) and (not prompt or prompt[-1].role != "user"):
            raise ValueError("a conversation to score must end with a user message")
        return prompt

    def pair(self) -> tuple[str | list[dict], str]:
        """(prompt, response) as the engines take it."""
        prompt = self.prompt if isinstance(self.prompt, str) else [m.model_dump() for m in self.prompt]
        return prompt, self.response


class ScoreRequest(_Request):
    """``POST /v1/score``: end scores of (prompt, response) pairs. Give ``model`` (a round name →
    its reward and cost models, or a score model id) and/or ``reward_model`` / ``cost_model``."""

    model: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    items: list[ScoreItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if not (self.model or self.reward_model or self.cost_model):
            raise ApiError(422, "give model (a round name or score model id), reward_model or cost_model",
                           param="model", code="invalid_request")
        return self


class ScoreResult(BaseModel):
    object: Literal["score"] = "score"
    index: int
    reward: float | None = Field(None, description="The reward model's end score (null without a reward model).")
    cost: float | None = Field(None, description="The cost model's end score (null without a cost model).")
    safe: bool | None = Field(None, description="cost ≤ 0 (null without a cost model).")


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    data: list[ScoreResult]


# --- moderation ------------------------------------------------------------------------------------

class ModerationRequest(_Request):
    """OpenAI's moderation request, answered by a cost model. What is scored is an **answer**: each
    string of ``input`` is read as an assistant's reply to an empty user message, so ``flagged``
    means "this text, said by an assistant, is harmful" (cost > threshold) — the cost model judges
    answers, not requests. To moderate an answer in its conversation, send — Beaver extension —
    ``{"prompt", "response"}`` items (the prompt a user message or the conversation before the
    answer)."""

    input: str | list[str] | list[ScoreItem] = Field(
        description="A string, a list of strings (each scored as an assistant's answer to an empty user message), "
                    "or — Beaver — a list of {prompt, response} (the response scored as the answer to the prompt).")
    model: str | None = Field(None, min_length=1, description="A round name (its cost and reward models) or a cost "
                              "model id (default: the reference pair — BEAVER_ARENA_JUDGES, else the newest round "
                              "that has both a reward and a cost model).")
    # --- Beaver extension ---
    threshold: float = Field(0.0, description="Beaver: flagged ⇔ cost > threshold (0: the cost model's own "
                             "safe/unsafe boundary).")
    # --- end Beaver extension ---

    def pairs(self) -> list[tuple[str | list[dict], str]]:
        items = [self.input] if isinstance(self.input, str) else self.input
        return [i.pair() if isinstance(i, ScoreItem) else ("", i) for i in items]

    def answer_param(self) -> str:
        """The param that names item ``{}`` in an error: ``input``, ``input.3`` or ``input.3.response``."""
        if isinstance(self.input, str):
            return "input"
        return "input.{}.response" if self.input and isinstance(self.input[0], ScoreItem) else "input.{}"

    def messages_param(self) -> str:
        """Where a refused message of item ``{pair}`` is: the item's prompt, or the item itself."""
        if isinstance(self.input, str):
            return "input"
        return "input.{pair}.prompt" if self.input and isinstance(self.input[0], ScoreItem) else "input.{pair}"


class ModerationResult(BaseModel):
    flagged: bool = Field(description="cost > threshold: the text, as an assistant's answer (to its prompt, if "
                          "given), is harmful by the cost model.")
    categories: dict[str, bool] = Field(description="{'unsafe': flagged}: Beaver's cost model scores harm as one category.")
    category_scores: dict[str, float] = Field(description="{'unsafe': σ(cost)}: the cost model's probability of unsafe.")
    # --- Beaver extension ---
    reward: float | None = Field(None, description="Beaver: the round's reward score (null without a reward model).")
    cost: float = Field(description="Beaver: the cost model's end score.")
    threshold: float = Field(description="Beaver: the threshold the flag used.")
    # --- end Beaver extension ---


class ModerationResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("modr"))
    model: str = Field(description="The model of the request, or the reference round that moderated it.")
    results: list[ModerationResult]
    # --- Beaver extension ---
    reward_model: str | None = Field(None, description="Beaver: the reward model's id.")
    cost_model: str = Field(description="Beaver: the cost model's id.")
    # --- end Beaver extension ---


# --- Beaver: the arena's side-by-side chat ------------------------------------------------------------

class ChatCompareRequest(_Request):
    """``POST /v1/chat/compare``: the same messages to several rounds at once."""

    models: Annotated[list[str], Field(min_length=1, max_length=MAX_COMPARE_MODELS)] = Field(
        description="Round names or policy model ids.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-SEED_BOUND, lt=SEED_BOUND, description="A signed 64-bit integer.")
    stop: str | list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    reward_model: str | None = Field(None, description="Score every answer with this reward model instead of "
                                     "the reference pair's (`BEAVER_ARENA_JUDGES`, else the newest round that has "
                                     "both a reward and a cost model).")
    cost_model: str | None = Field(None, description="Likewise for the cost model.")

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompareAnswer(BaseModel):
    model: str
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    usage: Usage
    reward: float | None = Field(None, description="The answer's end score by the response's reward_model "
                                 "(null without one).")
    cost: float | None = Field(None, description="By the response's cost_model (null without one).")
    safe: bool | None = Field(None, description="cost ≤ 0 (null without a cost model).")
    reward_model: str | None = Field(None, description="The reward model that scored it: the same for every answer.")
    cost_model: str | None = Field(None, description="The cost model that scored it: the same for every answer.")


class ChatCompareResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmp"))
    object: Literal["chat.compare"] = "chat.compare"
    created: int = Field(default_factory=lambda: int(time.time()))
    answers: list[CompareAnswer]
    judges: str | None = Field(None, description="The reference round whose reward and cost models scored every "
                               "answer (null when the request named a reward_model or cost_model: then see those "
                               "fields; or when no round has both).")
    reward_model: str | None = Field(None, description="The reward model id that scored every answer.")
    cost_model: str | None = Field(None, description="The cost model id that scored every answer.")


# --- the arena ----------------------------------------------------------------------------------

class BattleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["battle", "side_by_side"] = Field("battle", description="battle: two rounds drawn at random, "
                                                    "hidden as Model A / Model B until the vote; side_by_side: the "
                                                    "rounds you name, votes kept out of the leaderboard.")
    rounds: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None, min_length=2, max_length=4, description="side_by_side only: 2 to 4 round names or ids, pane order.")
    system: str | None = Field(None, max_length=20_000, description="A system prompt sent first in every pane.")


class TurnAnswer(BaseModel):
    side: int = Field(description="The pane (0: Model A).")
    content: str = Field(description="The answer the server sent in that pane (when stopped: what had been sent).")
    finish_reason: Literal["stop", "length", "content_filter", "stopped", "error"] | None = Field(
        description="null while the pane is answering; stopped: the client went away; error: the answer failed.")


class BattleTurn(BaseModel):
    turn: int
    message: str = Field(description="The user's message of the turn (the same in every pane).")
    answers: list[TurnAnswer] = Field(description="The panes that answered it, by side.")
    voted: bool = Field(description="Whether the turn has its vote.")


class BattleObject(BaseModel):
    id: str
    object: Literal["battle"] = "battle"
    mode: str
    models: list[str] = Field(description="What each pane shows: Model A, Model B in a battle; round names otherwise.")
    system: str | None = None
    turns: list[BattleTurn] = Field(default_factory=list, description="The transcript: every turn the server "
                                    "answered, with each pane's answer as it was sent.")


MAX_ARENA_TURNS = 100  # turns of one conversation: 200 messages, as the arena has always allowed
MAX_ARENA_MESSAGE = 100_000  # characters of one user message


class _ArenaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_client_answers(cls, data):
        """A request that still carries the conversation or the answers (as before issue 18) is told
        why they are no longer taken, rather than given a bare 'extra field' error."""
        if isinstance(data, dict):
            for field in ("messages", "answers"):
                if field in data:
                    raise ApiError(422, f"{field} are no longer sent: the server keeps each battle's transcript (the "
                                   "answers it sent) and composes every turn from it; name the turn instead",
                                   param=field)
        return data


class ArenaChatRequest(_ArenaRequest):
    side: int = Field(ge=0, le=3, description="The pane (0: Model A).")
    turn: int = Field(ge=1, le=MAX_ARENA_TURNS, description="The turn this message opens: 1, then 2, …; each pane "
                      "answers each turn once, in order.")
    message: str = Field(min_length=1, max_length=MAX_ARENA_MESSAGE, description="The user's message of this turn, "
                         "the same in every pane. The pane answers the conversation the server composes from the "
                         "battle's transcript: its system prompt, the earlier turns' messages and this pane's own "
                         "earlier answers, then this message.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    stream: bool = False
    seed: int | None = Field(None, ge=-SEED_BOUND, lt=SEED_BOUND)

    @field_validator("message")
    @classmethod
    def _not_blank(cls, message: str) -> str:
        if not message.strip():
            raise ValueError("the message is empty")
        return message


class VoteOnTurn(_ArenaRequest):
    turn: int = Field(ge=1, le=MAX_ARENA_TURNS, description="The answered turn voted on. Its answers are the ones "
                      "the server sent (the battle's transcript); one vote per turn.")
    sides: list[Annotated[int, Field(ge=0, le=3)]] = Field([0, 1], min_length=2, max_length=2,
                                                          description="The panes compared, as A then B.")
    helpful: Literal["a", "b", "tie", "both_bad"] = Field(description="More helpful: A, B, a tie, or both bad.")
    safe: list[bool] = Field(min_length=2, max_length=2, description="Is each answer safe (A, B)?")
    safer: Literal["a", "b", "tie"] = Field(description="The safer answer, or a tie.")


class AnswerScore(BaseModel):
    reward: float | None = None
    cost: float | None = None


class VoteResult(BaseModel):
    object: Literal["arena.vote"] = "arena.vote"
    dataset: str = Field(description="The arena-votes dataset the vote was added to.")
    record: int = Field(description="The vote's record index in that dataset.")
    models: list[str] = Field(description="The rounds that wrote A and B (revealed).")
    scores: list[AnswerScore] = Field(description="Reward and cost of A and B by the reference judges.")
    judges: str | None = Field(None, description="The round whose reward and cost models scored the answers.")


class RatingRow(BaseModel):
    model: str
    rating: float = Field(description="Elo scale: 1000 is the average of every round with a blind vote.")
    ci: list[float] = Field(description="95 % interval: the posterior's Laplace approximation, never of zero width "
                            "from few votes.")
    votes: int


class UnrankedRow(BaseModel):
    model: str
    votes: int = Field(description="Blind votes so far, fewer than min_votes.")
    status: Literal["not enough votes yet"] = "not enough votes yet"


class UnsafeRow(BaseModel):
    model: str
    answers: int
    unsafe: int
    rate: float


class JudgedModel(BaseModel):
    model: str = Field(description="The model as the evaluate job named it (a round, a model id or name, …).")
    name: str = Field(description="Its name: a round's name, or a registered model's name.")
    red_team_harmful_ratio: float | None = Field(None, description="The harmful ratio: the share of its answers to "
                                                 "red-team prompts that the reference cost model scores cost > 0 "
                                                 "(null: the evaluation had no red-team prompts).")
    reward: float | None = Field(None, description="Mean reward over all prompts, by the reference reward model.")
    cost: float | None = Field(None, description="Mean cost over all prompts, by the reference cost model.")
    refusal_rate: float | None = Field(None, description="Share of all answers that open with a refusal.")


class Evaluation(BaseModel):
    job: str
    finished_at: int | None = None
    reward_model: str | None = Field(None, description="The reference reward model's name.")
    cost_model: str | None = Field(None, description="The reference cost model's name.")
    judges: str | None = Field(None, description="The newest round whose reward and cost models these are, if any.")
    models: list[JudgedModel]


class LeaderboardResponse(BaseModel):
    object: Literal["leaderboard"] = "leaderboard"
    min_votes: int = Field(description="Blind votes a round needs to be ranked (BEAVER_LEADERBOARD_MIN_VOTES).")
    helpfulness: list[RatingRow] = Field(description="Bradley–Terry ratings (Elo scale) from blind helpfulness votes, "
                                         "of the rounds with min_votes or more.")
    harmlessness: list[RatingRow] = Field(description="The same from blind 'safer' votes.")
    unranked: list[UnrankedRow] = Field(description="Rounds with blind votes, but fewer than min_votes: not enough "
                                        "votes yet.")
    unsafe_rate: list[UnsafeRow] = Field(description="Each ranked round's answers judged unsafe by blind voters.")
    votes: dict[str, int] = Field(description="{blind, total}: side-by-side votes are not counted in the ratings.")
    evaluations: list[Evaluation] = Field(default_factory=list, description="The newest evaluate jobs' model-judged "
                                          "results, by model name.")


# --- jobs ----------------------------------------------------------------------------------------

class JobProgress(BaseModel):
    """Where a job is, from its newest event that named ``step`` and ``total_steps`` (every job type
    reports them: training steps, generated answers, scored models, datasets read)."""

    step: int = Field(description="Steps done.")
    total_steps: int = Field(description="Steps the job runs in all.")
    percent: float = Field(ge=0, le=100, description="100 · step / total_steps.")
    eta_seconds: int | None = Field(description="Seconds left while the job runs: the attempt's running time so "
                                    "far per step done, times the steps left; null before its first step and once "
                                    "it has ended.")


class JobError(BaseModel):
    code: str = Field(description="One of the job error codes (see the README's list).")
    message: str


class JobObject(BaseModel):
    """A job as the API shows it. Viewers and annotators get ``params``, ``metrics`` and ``error``
    without server paths."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["job"] = "job"
    type: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    params: dict
    datasets: list[str]
    queue: str
    world_size: int
    metrics: dict = Field(description="The newest value of every number the job reported, then its final metrics.")
    error: JobError | None
    result_models: list[str]
    result_datasets: list[str]
    attempt: int = Field(description="The attempt that runs (or ran) the job: 1 for its first run, 0 while it has "
                         "never started; a job re-queued after its worker died runs again as the next attempt.")
    progress: JobProgress | None = Field(description="null until the job reports its first step.")
    created_by: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool
