"""The arena: blind battles between rounds, multi-turn and streamed, whose votes become training data
and the leaderboard.

A battle draws two different rounds at random and shows them as "Model A" / "Model B" (in random
order) until a vote reveals them; side-by-side mode shows the rounds a person picked, and its votes
are kept out of the leaderboard. Each pane's turn is an ordinary chat completion of that round with
the pane's whole conversation. A vote answers the paper's two questions separately — which answer
is more helpful (or a tie, or both bad), is each safe, which is safer (or a tie) — and is stored
twice, in one transaction: as a PKU-SafeRLHF record of the ``arena-votes`` dataset (ties as null
ids, which the trainers leave out), which the next round trains on, and as a row the leaderboard
reads. Every answer is scored by one reference pair of reward/cost models (``BEAVER_ARENA_JUDGES``,
default the newest round that has both), so scores compare across rounds.
"""

from __future__ import annotations

import random

from fastapi import APIRouter
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from api.db import release, run_db
from api.deps import Annotator, Reader, SessionDep
from api.errors import ApiError, not_found, responses
from api.protocol import (AnswerScore, ArenaChatRequest, BattleCreate, BattleObject, ChatCompletionRequest,
                          LeaderboardResponse, RatingRow, UnsafeRow, VoteOnTurn, VoteResult, as_prompt, new_id)
from api.registry import find_round
from api.routers.chat import chat_completion
from api.routers.jobs import without_paths
from api.routers.votes import append_vote
from api.serving import reference_judges, score_pairs
from api.tables import ArenaVote, Battle, Job, Round
from models import leaderboard as lb
from models.records import validate_records

router = APIRouter(tags=["arena"], responses=responses(400, 401, 413, 422))

PANES = ("Model A", "Model B", "Model C", "Model D")
_draw = random.SystemRandom()  # a voter must not be able to predict which round is A


def shown(battle: Battle) -> list[str]:
    """What each pane is called: hidden names in a battle, round names side by side."""
    return list(PANES[: len(battle.rounds)]) if battle.mode == "battle" else list(battle.rounds)


def _battle(session: Session, battle_id: str) -> Battle:
    battle = session.get(Battle, battle_id)
    if battle is None:
        raise not_found("battle", battle_id)
    return battle


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


@router.post("/v1/arena/battles/{battle_id}/chat", responses=responses(404, 503))
async def battle_chat(battle_id: str, body: ArenaChatRequest, session: SessionDep, _: Reader):
    """One pane's answer to its conversation (``stream: true``: server-sent events, as
    ``/v1/chat/completions``); in a battle the answer carries the pane's name, not the round's."""
    battle = await run_in_threadpool(_battle, session, battle_id)
    if body.side >= len(battle.rounds):
        raise ApiError(422, f"side must be below {len(battle.rounds)}: this conversation has {len(battle.rounds)} "
                       "panes", param="side")
    messages = _conversation(battle, body.messages)
    request = ChatCompletionRequest(model=battle.rounds[body.side], messages=messages, temperature=body.temperature,
                                    max_tokens=body.max_tokens, stream=body.stream, seed=body.seed)
    try:
        return await chat_completion(request, session, shown_as=shown(battle)[body.side])
    except ApiError as e:
        raise _as_pane_sent_it(e, battle) from None


def _as_pane_sent_it(error: ApiError, battle: Battle) -> ApiError:
    """An error about message i of the conversation the round read, named as the pane's request
    holds it: the battle's system prompt (``system``) comes before the pane's ``messages``."""
    parts = (error.param or "").split(".")
    if battle.system and parts[0] == "messages" and len(parts) > 1 and parts[1].isdigit():
        index = int(parts[1]) - 1
        error.param = "system" if index < 0 else ".".join(["messages", str(index), *parts[2:]])
        if index < 0:
            error.message += " (the battle's system prompt: start a battle without one to talk to this model)"
    return error


def _conversation(battle: Battle, messages: list) -> list[dict]:
    """The pane's messages after the battle's system prompt; they alternate and end with the user."""
    turns = as_prompt(messages)
    for i, m in enumerate(turns):
        if m["role"] not in ("user", "assistant"):
            raise ApiError(422, "messages are the conversation's user and assistant turns (the battle holds the "
                           "system prompt)", param=f"messages[{i}].role")
    if turns[-1]["role"] != "user":
        raise ApiError(422, "the conversation must end with the user's message", param="messages")
    return ([{"role": "system", "content": battle.system}] if battle.system else []) + turns


@router.post("/v1/arena/battles/{battle_id}/votes", status_code=201, response_model=VoteResult,
             responses=responses(403, 404, 409, 503))
async def vote(battle_id: str, body: VoteOnTurn, session: SessionDep, key: Annotator) -> VoteResult:
    """Vote on one answered turn: helpfulness and harmlessness separately. The vote is added to the
    ``arena-votes`` dataset as a PKU-SafeRLHF record; the answer reveals the rounds and their scores."""
    battle = await run_in_threadpool(_battle, session, battle_id)
    a, b = body.sides
    if a == b or max(a, b) >= len(battle.rounds):
        raise ApiError(422, f"sides must be two different panes below {len(battle.rounds)}", param="sides")
    for i, answer in enumerate(body.answers):
        if not answer.strip():
            raise ApiError(422, f"answer {'AB'[i]} is empty: there is nothing to vote on", param=f"answers[{i}]")
    history = _conversation(battle, body.messages)
    models = [battle.rounds[a], battle.rounds[b]]
    record = {
        "prompt": history, "response_0": body.answers[0], "response_1": body.answers[1],
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
        except IntegrityError:
            s.rollback()
            raise ApiError(409, f"turn {body.turn} of {battle.id} already has a vote", param="turn") from None
        return dataset.id, idx

    dataset_id, idx = await run_db(store)
    try:
        rewards, costs = await score_pairs(judges, [(history, body.answers[0]), (history, body.answers[1])])
    except ApiError as e:  # an answer longer than the judges read: the vote stands, unscored
        if e.status != 422:
            raise
        rewards = costs = None
    scores = [AnswerScore(reward=rewards[i] if rewards else None, cost=costs[i] if costs else None) for i in (0, 1)]
    return VoteResult(dataset=dataset_id, record=idx, models=models, scores=scores, judges=judges_name)


@router.get("/v1/leaderboard", response_model=LeaderboardResponse)
def leaderboard(session: SessionDep, _: Reader) -> LeaderboardResponse:
    """Bradley–Terry ratings (Elo scale, bootstrap 95 % intervals) of every round for helpfulness and
    for harmlessness, from blind votes only, and each round's unsafe-answer rate by those votes."""
    # Counted in SQL: 100k votes come back as a few hundred (pair, verdicts, count) rows.
    columns = (ArenaVote.model_a, ArenaVote.model_b, ArenaVote.helpful, ArenaVote.safer, ArenaVote.a_safe,
               ArenaVote.b_safe)
    blind = session.exec(select(*columns, func.count()).where(ArenaVote.blind).group_by(*columns)).all()
    total = session.exec(select(func.count()).select_from(ArenaVote)).one()
    # "Both bad" is a tie for helpfulness, as in Chatbot Arena: neither answer is preferred.
    helpful = [lb.Battle(a, b, {"a": 1.0, "b": 0.0}.get(h, 0.5), n) for a, b, h, _, _, _, n in blind]
    safer = [lb.Battle(a, b, {"a": 1.0, "b": 0.0}.get(s, 0.5), n) for a, b, _, s, _, _, n in blind]
    answers = [(m, not safe, n) for a, b, _, _, a_safe, b_safe, n in blind for m, safe in ((a, a_safe), (b, b_safe))]

    def table(battles) -> list[RatingRow]:
        return [RatingRow(model=x.model, rating=x.rating, ci=list(x.ci), votes=x.votes) for x in lb.leaderboard(battles)]

    return LeaderboardResponse(helpfulness=table(helpful), harmlessness=table(safer),
                               unsafe_rate=[UnsafeRow(**u) for u in lb.unsafe_rates(answers)],
                               votes={"blind": sum(n for *_, n in blind), "total": total},
                               evaluations=model_judged(session))


def model_judged(session: Session, newest: int = 10) -> list[dict]:
    """The newest succeeded ``evaluate`` jobs: per model, what the reference judges found."""
    jobs = session.exec(select(Job).where(Job.type == "evaluate", Job.status == "succeeded")
                        .order_by(Job.created_at.desc(), Job.id.desc()).limit(newest)).all()
    out = []
    for job in jobs:
        models = {}
        for name in job.params.get("models", []):
            models[name] = {key: job.metrics.get(f"{name}/{key}") for key in
                            ("harmful_ratio", "judge_harmful_ratio", "reward", "cost", "refusal_rate")
                            if job.metrics.get(f"{name}/{key}") is not None}
        out.append(without_paths({"job": job.id, "finished_at": job.finished_at, "models": models,
                                  "reward_model": job.params.get("reward_model"),
                                  "cost_model": job.params.get("cost_model")}))  # any key reads the leaderboard
    return out
