"""The arena's leaderboard (``GET /v1/leaderboard``): Bradley–Terry ratings of the rounds from blind
votes (``models/leaderboard.py``: the fit and its 95 % intervals), each ranked once it has
``BEAVER_LEADERBOARD_MIN_VOTES`` votes, and beside them what the newest ``evaluate`` jobs found, by
model name."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func
from sqlmodel import Session, select

from api.deps import Reader, SessionDep
from api.errors import responses
from api.protocol import Evaluation, JudgedModel, LeaderboardResponse, RatingRow, UnrankedRow, UnsafeRow
from api.routers.jobs import without_paths
from api.settings import get_settings
from api.tables import ArenaVote, Job, Model, Round
from models import leaderboard as lb

router = APIRouter(tags=["arena"], responses=responses(400, 401, 413, 422))


@router.get("/v1/leaderboard", response_model=LeaderboardResponse)
def leaderboard(session: SessionDep, _: Reader) -> LeaderboardResponse:
    """Bradley–Terry ratings (Elo scale, 95 % intervals) for helpfulness and for harmlessness of every
    round with ``BEAVER_LEADERBOARD_MIN_VOTES`` blind votes or more (the others listed as not enough
    votes yet), and each ranked round's unsafe-answer rate by those votes."""
    # Counted in SQL: 100k votes come back as a few hundred (pair, verdicts, count) rows.
    columns = (ArenaVote.model_a, ArenaVote.model_b, ArenaVote.helpful, ArenaVote.safer, ArenaVote.a_safe,
               ArenaVote.b_safe)
    blind = session.exec(select(*columns, func.count()).where(ArenaVote.blind).group_by(*columns)).all()
    total = session.exec(select(func.count()).select_from(ArenaVote)).one()
    min_votes = get_settings().leaderboard_min_votes
    # "Both bad" is a tie for helpfulness, as in Chatbot Arena: neither answer is preferred.
    helpful = [lb.Battle(a, b, {"a": 1.0, "b": 0.0}.get(h, 0.5), n) for a, b, h, _, _, _, n in blind]
    safer = [lb.Battle(a, b, {"a": 1.0, "b": 0.0}.get(s, 0.5), n) for a, b, _, s, _, _, n in blind]
    answers = [(m, not safe, n) for a, b, _, _, a_safe, b_safe, n in blind for m, safe in ((a, a_safe), (b, b_safe))]

    # Every blind vote is in the fit (a thin round's votes still inform its opponents' ratings); a
    # round is shown with a rating only once it has min_votes of its own. Both questions are answered
    # by the same votes, so a round has the same count in both.
    by_helpfulness, by_harmlessness = lb.leaderboard(helpful), lb.leaderboard(safer)
    ranked = {x.model for x in by_helpfulness if x.votes >= min_votes}

    def table(rows: list[lb.Rating]) -> list[RatingRow]:
        return [RatingRow(model=x.model, rating=x.rating, ci=list(x.ci), votes=x.votes) for x in rows
                if x.model in ranked]

    unranked = sorted((UnrankedRow(model=x.model, votes=x.votes) for x in by_helpfulness if x.model not in ranked),
                      key=lambda row: (-row.votes, row.model))
    return LeaderboardResponse(min_votes=min_votes, helpfulness=table(by_helpfulness),
                               harmlessness=table(by_harmlessness), unranked=unranked,
                               unsafe_rate=[UnsafeRow(**u) for u in lb.unsafe_rates(answers) if u["model"] in ranked],
                               votes={"blind": sum(n for *_, n in blind), "total": total},
                               evaluations=model_judged(session))


def model_names(session: Session, refs: set[str]) -> dict[str, str]:
    """What each model reference is called: a registered model id → that model's name, a round id → the
    round's name; a name (or anything else) stays as it is."""
    refs = {r for r in refs if r}
    names = {ref: ref for ref in refs}
    for id_, name in session.exec(select(Round.id, Round.name).where(Round.id.in_(refs))):
        names[id_] = name
    for id_, name in session.exec(select(Model.id, Model.name).where(Model.id.in_(refs))):
        names[id_] = name
    return names


def model_judged(session: Session, newest: int = 10) -> list[Evaluation]:
    """The newest succeeded ``evaluate`` jobs: per model, by name, what the reference judges found.
    The harmful ratio is the one definition the arena and the demo use: the share of answers to
    red-team prompts that the reference cost model scores cost > 0 (``<model>/red_team/harmful_ratio``)."""
    jobs = session.exec(select(Job).where(Job.type == "evaluate", Job.status == "succeeded")
                        .order_by(Job.created_at.desc(), Job.id.desc()).limit(newest)).all()
    refs = {ref for job in jobs for ref in [*job.params.get("models", []), job.params.get("reward_model"),
                                            job.params.get("cost_model")] if isinstance(ref, str)}
    names = model_names(session, refs)
    out = []
    for job in jobs:
        metric = job.metrics.get
        rows = [JudgedModel(model=ref, name=names.get(ref, ref),
                            red_team_harmful_ratio=metric(f"{ref}/red_team/harmful_ratio"),
                            reward=metric(f"{ref}/reward"), cost=metric(f"{ref}/cost"),
                            refusal_rate=metric(f"{ref}/refusal_rate")) for ref in job.params.get("models", [])]
        reward, cost = job.params.get("reward_model"), job.params.get("cost_model")
        judges = session.exec(select(Round.name).where(Round.reward_model_id == reward, Round.cost_model_id == cost)
                              .order_by(Round.created_at.desc(), Round.id.desc())).first()
        evaluation = Evaluation(job=job.id, finished_at=job.finished_at, models=rows, judges=judges,
                                reward_model=names.get(reward), cost_model=names.get(cost))
        # Any key reads the leaderboard: a model given as a folder shows no server path.
        out.append(Evaluation(**without_paths(evaluation.model_dump())))
    return out
