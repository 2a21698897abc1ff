"""The arena: blind battles between rounds, multi-turn and streamed, whose votes become training data
and the leaderboard (api/routers/leaderboard.py).

A battle draws two different rounds at random and shows them as "Model A" / "Model B" (in random
order) until a vote reveals them; side-by-side mode shows the rounds a person picked, and its votes
are kept out of the leaderboard. A battle belongs to the key that started it: another key's chat,
vote or read is a 404.

The server keeps each battle's transcript (issue 18): every turn's user message, the same in every
pane (``ArenaTurn``), and the answer each pane was sent (``ArenaAnswer``), stored when it is produced
— streamed or not; stopped early, what had been sent. A pane's turn is a chat completion of its
round with the conversation composed from the transcript (system prompt, earlier messages, this
pane's own earlier answers), so no client can put words in a round's mouth. A vote names a turn: its
answers come from the transcript, both panes must have answered it, and a turn has one vote whatever
panes it compares. The vote answers the paper's two questions separately — which answer is more
helpful (or a tie, or both bad), is each safe, which is safer (or a tie) — and is stored twice, in
one transaction: as a PKU-SafeRLHF record of the ``arena-votes`` dataset (ties as null ids, which the
trainers leave out), which the next round trains on, and as a row the leaderboard reads. Every answer
is scored by one reference pair of reward/cost models (``BEAVER_ARENA_JUDGES``, default the newest
round that has both), so scores compare across rounds.
"""

from __future__ import annotations

import json
import random

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from api.db import release, run_db
from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, not_found, responses
from api.protocol import (AnswerScore, ArenaChatRequest, BattleCreate, BattleObject, BattleTurn, ChatCompletionRequest,
                          TurnAnswer, VoteOnTurn, VoteResult, new_id)
from api.registry import find_round
from api.routers.chat import chat_completion
from api.routers.votes import append_vote
from api.serving import reference_judges, score_pairs
from api.tables import ApiKey, ArenaAnswer, ArenaTurn, ArenaVote, Battle, Round, now
from models.records import validate_records

router = APIRouter(tags=["arena"], responses=responses(400, 401, 413, 422))

PANES = ("Model A", "Model B", "Model C", "Model D")
_draw = random.SystemRandom()  # a voter must not be able to predict which round is A
# How long a pane's next turn waits for its previous answer to be stored: a stream the client
# stopped is stored once the server notices the disconnect, a moment after the client moved on.
ANSWER_WAIT_SECONDS = 10.0


def shown(battle: Battle) -> list[str]:
    """What each pane is called: hidden names in a battle, round names side by side."""
    return list(PANES[: len(battle.rounds)]) if battle.mode == "battle" else list(battle.rounds)


def _battle(session: Session, battle_id: str, key: ApiKey) -> Battle:
    """The battle, if ``key`` started it: another key's battle is "not found", as if it did not exist."""
    battle = session.get(Battle, battle_id)
    if battle is None or battle.created_by != key.id:
        raise not_found("battle", battle_id)
    session.expunge(battle)  # a plain value from here: the session's later rollbacks and close leave it be
    return battle


def _check_pane(battle: Battle, side: int, param: str = "side") -> None:
    if side >= len(battle.rounds):
        raise ApiError(422, f"{param} must be below {len(battle.rounds)}: this conversation has {len(battle.rounds)} "
                       "panes", param=param)


@router.post("/v1/arena/battles", status_code=201, response_model=BattleObject, responses=responses(404))
def create_battle(body: BattleCreate, session: SessionDep, key: Reader) -> BattleObject:
    """Start a conversation: a blind battle of two rounds drawn at random, or side by side."""
    if body.mode == "battle":
        if body.rounds:
            raise ApiError(422, "a battle draws its two rounds at random; name rounds in side_by_side mode",
                           param="rounds")
        names = list(session.exec(select(Round.name)))
        if len(names) < 2:
            raise ApiError(422, f"a battle needs at least two rounds; there {'is' if len(names) == 1 else 'are'} "
                           f"{len(names)}", param="mode")
        rounds = _draw.sample(names, 2)  # two different rounds, in random order
    else:
        if not body.rounds:
            raise ApiError(422, "side_by_side needs rounds: 2 to 4 round names", param="rounds")
        rounds = []
        for i, ref in enumerate(body.rounds):
            round_ = find_round(session, ref)
            if round_ is None:
                raise ApiError(404, f"no round {ref!r}", param=f"rounds[{i}]")
            if round_.name in rounds:
                raise ApiError(422, f"round {round_.name!r} is named twice", param=f"rounds[{i}]")
            rounds.append(round_.name)
    battle = Battle(id=new_id("battle"), mode=body.mode, rounds=rounds, system=body.system, created_by=key.id)
    session.add(battle)
    session.commit()
    return BattleObject(id=battle.id, mode=battle.mode, models=shown(battle), system=battle.system)


@router.get("/v1/arena/battles/{battle_id}", response_model=BattleObject, responses=responses(404))
def get_battle(battle_id: str, session: SessionDep, key: Reader) -> BattleObject:
    """The battle with its transcript: every turn's message and each pane's answer as it was sent."""
    battle = _battle(session, battle_id, key)
    turns = session.exec(select(ArenaTurn).where(ArenaTurn.battle_id == battle.id).order_by(ArenaTurn.turn)).all()
    answers = session.exec(select(ArenaAnswer).where(ArenaAnswer.battle_id == battle.id)
                           .order_by(ArenaAnswer.turn, ArenaAnswer.side)).all()
    voted = set(session.exec(select(ArenaVote.turn).where(ArenaVote.battle_id == battle.id)))
    return BattleObject(id=battle.id, mode=battle.mode, models=shown(battle), system=battle.system, turns=[
        BattleTurn(turn=t.turn, message=t.content, voted=t.turn in voted,
                   answers=[TurnAnswer(side=a.side, content=a.content, finish_reason=a.finish_reason)
                            for a in answers if a.turn == t.turn]) for t in turns])


# --- the transcript ---------------------------------------------------------------------------------

def _history(session: Session, battle: Battle, side: int, turn: int) -> list[dict]:
    """Pane ``side``'s conversation up to and including turn ``turn``'s user message, from the
    transcript: the system prompt, then each earlier turn's message and this pane's answer to it."""
    turns = session.exec(select(ArenaTurn).where(ArenaTurn.battle_id == battle.id, ArenaTurn.turn <= turn)
                         .order_by(ArenaTurn.turn)).all()
    answers = {a.turn: a.content for a in session.exec(
        select(ArenaAnswer).where(ArenaAnswer.battle_id == battle.id, ArenaAnswer.side == side,
                                  ArenaAnswer.turn < turn))}
    messages = [{"role": "system", "content": battle.system}] if battle.system else []
    for t in turns:
        messages.append({"role": "user", "content": t.content})
        if t.turn < turn:
            messages.append({"role": "assistant", "content": answers[t.turn]})
    return messages


def _open_turn(session: Session, battle: Battle, side: int, turn: int, message: str) -> list[dict] | None:
    """Claim pane ``side``'s answer to turn ``turn`` (opening the turn with ``message`` if it is new)
    and return the conversation it answers; None while the pane's previous answer is still being
    stored. 409 for a turn out of order, a second answer, or another message than the turn's."""
    session.rollback()  # a fresh read each try (SQLite keeps a transaction's snapshot)
    name = shown(battle)[side]
    if turn > 1:
        previous = session.get(ArenaAnswer, (battle.id, turn - 1, side))
        if previous is None:
            raise ApiError(409, f"{name} has not answered turn {turn - 1}: the turns of a pane go in order",
                           param="turn")
        if previous.finish_reason is None:
            return None
    if session.get(ArenaAnswer, (battle.id, turn, side)) is not None:
        raise ApiError(409, f"{name} has already answered turn {turn}: each pane answers each turn once", param="turn")
    opened = session.get(ArenaTurn, (battle.id, turn))
    if opened is None:
        session.add(ArenaTurn(battle_id=battle.id, turn=turn, content=message))
        try:
            session.commit()
        except IntegrityError:  # the other pane opened it at the same moment
            session.rollback()
        opened = session.get(ArenaTurn, (battle.id, turn))
    if opened.content != message:
        raise ApiError(409, f"turn {turn} of this battle asks {_quote(opened.content)}: every pane answers the "
                       "same message", param="message")
    session.add(ArenaAnswer(battle_id=battle.id, turn=turn, side=side))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, f"{name} has already answered turn {turn}: each pane answers each turn once",
                       param="turn") from None
    return _history(session, battle, side, turn)


def _quote(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


async def _store_answer(battle_id: str, turn: int, side: int, content: str, finish_reason: str) -> None:
    """Write the answer the client was sent into the transcript, once (a stored answer never changes),
    shielded: a client that went away must not stop the record of what it was sent."""
    def write(s: Session) -> None:
        s.execute(update(ArenaAnswer).where(ArenaAnswer.battle_id == battle_id, ArenaAnswer.turn == turn,
                                            ArenaAnswer.side == side, ArenaAnswer.finish_reason.is_(None))
                  .values(content=content, finish_reason=finish_reason, finished_at=now()))
        s.commit()

    with anyio.CancelScope(shield=True):
        await run_db(write)


class TranscriptStream(StreamingResponse):
    """A pane's event stream, passed through unchanged; however it ends (finished, stopped by the
    client, failed), the text of the content deltas that reached the client is stored."""

    def __init__(self, inner: StreamingResponse, store):
        self.sent: list[str] = []
        self.finish_reason: str | None = None
        self._store = store
        super().__init__(self._watch(inner.body_iterator), media_type=inner.media_type)
        self.raw_headers = inner.raw_headers

    async def _watch(self, events):
        try:
            async for event in events:
                yield event
                self._read(event)  # the server took the event: the client was sent it
        finally:
            await events.aclose()

    def _read(self, event: str) -> None:
        data = event[len("data: "):].strip() if event.startswith("data: ") else ""
        if not data.startswith("{"):
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self.finish_reason = "error"
        for choice in chunk.get("choices", []):
            self.sent.append(choice.get("delta", {}).get("content") or "")
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # the engine stops generating for a client that left
            await self._store("".join(self.sent), self.finish_reason or "stopped")


@router.post("/v1/arena/battles/{battle_id}/chat", responses=responses(404, 409, 503))
async def battle_chat(battle_id: str, body: ArenaChatRequest, session: SessionDep, key: Reader):
    """One pane's answer to turn ``turn``: the battle's conversation so far in that pane, then
    ``message`` (``stream: true``: server-sent events, as ``/v1/chat/completions``); in a battle the
    answer carries the pane's name, not the round's. The answer is kept in the battle's transcript."""
    battle = await run_in_threadpool(_battle, session, battle_id, key)
    _check_pane(battle, body.side)
    deadline = anyio.current_time() + ANSWER_WAIT_SECONDS
    while (messages := await run_in_threadpool(_open_turn, session, battle, body.side, body.turn,
                                               body.message)) is None:
        if anyio.current_time() > deadline:
            raise ApiError(409, f"{shown(battle)[body.side]} is still answering turn {body.turn - 1}", param="turn")
        await anyio.sleep(0.05)

    async def store(content: str, finish_reason: str) -> None:
        await _store_answer(battle.id, body.turn, body.side, content, finish_reason)

    try:
        request = ChatCompletionRequest(model=battle.rounds[body.side], messages=messages,
                                        temperature=body.temperature, max_tokens=body.max_tokens, stream=body.stream,
                                        seed=body.seed)
        response = await chat_completion(request, session, shown_as=shown(battle)[body.side])
    except BaseException as e:
        await store("", "error")  # nothing was sent; the pane's next turn may still come
        if isinstance(e, ApiError):
            raise _as_pane_sent_it(e, battle, len(messages)) from None
        raise
    if isinstance(response, StreamingResponse):
        return TranscriptStream(response, store)
    choice = response.choices[0]
    await store(choice.message.content, choice.finish_reason)
    return response


def _as_pane_sent_it(error: ApiError, battle: Battle, length: int) -> ApiError:
    """An error about message i of the conversation the round read, named as the pane's request
    holds it: the battle's system prompt (``system``) comes first, the turn's ``message`` last (the
    messages between are the transcript's)."""
    parts = (error.param or "").split(".")
    if parts[0] == "messages" and len(parts) > 1 and parts[1].isdigit():
        index = int(parts[1])
        if battle.system and index == 0:
            error.param = "system"
            error.message += " (the battle's system prompt: start a battle without one to talk to this model)"
        elif index == length - 1:
            error.param = "message"
    return error


def _voted_answers(session: Session, battle: Battle, turn: int, sides: list[int]) -> list[ArenaAnswer]:
    """The two answers a vote on ``turn`` compares, from the transcript; 409 (422 for an empty one)
    naming the pane when one cannot be voted on."""
    out = []
    for letter, side in zip("AB", sides):
        name = shown(battle)[side]
        answer = session.get(ArenaAnswer, (battle.id, turn, side))
        if answer is None:
            raise ApiError(409, f"{name} has not answered turn {turn}: a vote is on a turn both panes answered",
                           param="turn")
        if answer.finish_reason is None:
            raise ApiError(409, f"{name} is still answering turn {turn}", param="turn")
        if answer.finish_reason == "error":
            raise ApiError(409, f"{name}'s answer to turn {turn} failed: there is nothing to vote on", param="turn")
        if not answer.content.strip():
            raise ApiError(422, f"{name}'s answer to turn {turn} (answer {letter}) is empty: there is nothing to "
                           "vote on", param="turn")
        out.append(answer)
    return out


@router.post("/v1/arena/battles/{battle_id}/votes", status_code=201, response_model=VoteResult,
             responses=responses(403, 404, 409, 503))
async def vote(battle_id: str, body: VoteOnTurn, session: SessionDep, key: Annotator) -> VoteResult:
    """Vote on one answered turn: helpfulness and harmlessness separately, of the answers the server
    sent (the transcript); one vote per turn. The vote is added to the ``arena-votes`` dataset as a
    PKU-SafeRLHF record; the answer reveals the rounds and their scores."""
    battle = await run_in_threadpool(_battle, session, battle_id, key)
    a, b = body.sides
    _check_pane(battle, max(a, b), param="sides")
    if a == b:
        raise ApiError(422, "sides must be two different panes", param="sides")

    def read(s: Session) -> tuple[list[ArenaAnswer], list[list[dict]]]:
        answers = _voted_answers(s, battle, body.turn, body.sides)
        return answers, [_history(s, battle, side, body.turn) for side in body.sides]

    answers, histories = await run_in_threadpool(read, session)
    texts = [answer.content for answer in answers]
    models = [battle.rounds[a], battle.rounds[b]]
    record = {
        # The conversation as pane A saw it (a PKU-SafeRLHF record has one prompt; before turn 2 both
        # panes' conversations are the same).
        "prompt": histories[0], "response_0": texts[0], "response_1": texts[1],
        "is_response_0_safe": body.safe[0], "is_response_1_safe": body.safe[1],
        "better_response_id": {"a": 0, "b": 1}.get(body.helpful),  # tie, both bad: no order (null)
        "safer_response_id": {"a": 0, "b": 1}.get(body.safer),
        "response_0_source": models[0], "response_1_source": models[1],
        "arena": {"battle": battle.id, "turn": body.turn, "blind": None, "mode": battle.mode, "panes": [a, b],
                  "helpful": body.helpful, "safer": body.safer, "voter": key.id},
    }
    errors = validate_records("preference", [record])
    if errors:
        field = {"safer_response_id": "safer", "better_response_id": "helpful"}.get(errors[0].field, errors[0].field)
        raise ApiError(422, errors[0].message, param=field)
    judges_name, judges = await run_in_threadpool(reference_judges, session)
    await release(session)  # no session held while the vote waits for the write lock or the judges

    def store(s: Session) -> tuple[str, int]:
        # Blind only until the battle's first vote reveals its rounds: later turns of the same
        # conversation are still training data, but no longer a blind judgement for the leaderboard.
        revealed = s.exec(select(ArenaVote.id).where(ArenaVote.battle_id == battle.id)).first() is not None
        blind = battle.mode == "battle" and not revealed
        record["arena"]["blind"] = blind
        s.rollback()  # append_vote starts its own (locked) transaction

        def with_row(s: Session, dataset_id: str, idx: int) -> None:
            s.add(ArenaVote(battle_id=battle.id, turn=body.turn, sides=f"{a},{b}", model_a=models[0],
                            model_b=models[1], blind=blind, helpful=body.helpful, safer=body.safer,
                            a_safe=body.safe[0], b_safe=body.safe[1], dataset_id=dataset_id, record_idx=idx,
                            created_by=key.id))
        try:
            dataset, idx = append_vote(s, record, key.id, also=with_row)
        except IntegrityError:  # (battle, turn) is unique: a second vote, whatever its sides
            s.rollback()
            raise ApiError(409, f"turn {body.turn} of {battle.id} already has a vote (one vote per turn)",
                           param="turn") from None
        return dataset.id, idx

    dataset_id, idx = await run_db(store)
    try:
        rewards, costs = await score_pairs(judges, [(histories[0], texts[0]), (histories[1], texts[1])])
    except ApiError as e:  # an answer longer than the judges read: the vote stands, unscored
        if e.status != 422:
            raise
        rewards = costs = None
    scores = [AnswerScore(reward=rewards[i] if rewards else None, cost=costs[i] if costs else None) for i in (0, 1)]
    return VoteResult(dataset=dataset_id, record=idx, models=models, scores=scores, judges=judges_name)
