"""``beaver``: run the platform (up, api, worker), migrate the database, manage API keys; and, through
the REST API (``api.client``), upload datasets, submit and follow jobs, pull models."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

cli = typer.Typer(help="Beaver: a self-hosted Safe RLHF platform.", no_args_is_help=True, add_completion=False)
db_cli = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
# The remote commands (a Beaver anywhere, through its REST API): their code is after the platform's.
EXIT_HELP = ("Exit codes: 0 ok, 1 the job failed or was cancelled (jobs follow), 2 usage error, 3 the API refused "
             "(4xx/5xx, its error printed), 4 the API unreachable.")
datasets_cli = typer.Typer(help=f"Datasets on a Beaver (BEAVER_URL, BEAVER_API_KEY). {EXIT_HELP}", no_args_is_help=True)
jobs_cli = typer.Typer(help="Jobs on a Beaver (BEAVER_URL, BEAVER_API_KEY); bare `beaver jobs`: every job type's "
                       f"params (the reference the README holds). {EXIT_HELP}", invoke_without_command=True)
models_cli = typer.Typer(help=f"Models on a Beaver (BEAVER_URL, BEAVER_API_KEY). {EXIT_HELP}", no_args_is_help=True)
rounds_cli = typer.Typer(help=f"Safe RLHF rounds on a Beaver (BEAVER_URL, BEAVER_API_KEY). {EXIT_HELP}",
                         no_args_is_help=True)
for _group, _name in ((datasets_cli, "datasets"), (jobs_cli, "jobs"), (models_cli, "models"), (rounds_cli, "rounds")):
    cli.add_typer(_group, name=_name)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _prepare_database() -> None:
    """Check the database answers, then ``upgrade head``; one readable line if it does not."""
    from api.db import DatabaseUnavailable, upgrade
    from api.settings import get_settings

    get_settings().home.mkdir(parents=True, exist_ok=True)
    try:
        upgrade()
    except DatabaseUnavailable as e:
        _fail(str(e))


def _check_broker() -> None:
    from kombu import Connection

    from api.settings import get_settings, mask_url

    url = get_settings().resolved_broker_url
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot reach broker {mask_url(url)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _ensure_admin_key() -> None:
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.deps import create_key
    from api.tables import ApiKey

    with Session(get_engine()) as session:
        if session.exec(select(ApiKey)).first() is not None:
            return
        _, key = create_key(session, "admin", "admin")
    typer.secho("Created the first admin API key (shown only this once; keep it):", fg=typer.colors.GREEN)
    typer.echo(f"    {key}")


def _serve(host: str, port: int) -> None:
    import uvicorn

    from api.app import create_app

    # An open event stream (SSE) would hold a graceful shutdown forever: 5 s, then it is closed.
    uvicorn.run(create_app(), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def _exit_on_sigterm() -> None:
    # SIGTERM's default action kills the process without running ``finally`` blocks, which
    # would orphan the worker subprocess; as SystemExit it unwinds like Ctrl-C. (uvicorn restores
    # this handler and re-raises the signal after its own graceful shutdown.)
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def worker_command(queues: str = "gpu,cpu", name: str = "beaver@%h", pool: str | None = None,
                   concurrency: int = 1, ranks: int | None = None) -> list[str]:
    from api.queue import default_ranks, worker_queues
    from api.settings import get_settings

    queues = worker_queues(queues, ranks or default_ranks())
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues, "-n", name,
            "--pool", pool or get_settings().worker_pool, "--concurrency", str(concurrency), "--loglevel", "INFO"]


RANKS_HELP = ("The largest job (world_size) this worker runs, one process per rank: default the GPUs it sees, "
              "or 1 on a CPU host (CPU ranks: set it to run multi-rank jobs on CPU).")
RAY_RANKS_HELP = ("With BEAVER_RAY_ADDRESS: the largest job this worker runs on the Ray cluster, jobs larger than "
                  "--ranks there (one rank per bundle); default the cluster's BEAVER_RAY_RANK_RESOURCE count at start. "
                  "Larger than the cluster: such jobs wait, queued, for hosts to join.")


@cli.command()
def up(host: Optional[str] = typer.Option(None, help="Bind address (default BEAVER_HOST)."),
       port: Optional[int] = typer.Option(None, help="Port (default BEAVER_PORT)."),
       ranks: Optional[int] = typer.Option(None, min=1, help=RANKS_HELP)) -> None:
    """Run everything on this machine: migrations, the API and one embedded worker."""
    from api.settings import get_settings

    settings = get_settings()
    _prepare_database()
    _check_broker()
    _ensure_admin_key()
    _exit_on_sigterm()
    # Restarted when it dies; beaver up also reaps orphaned jobs meanwhile (workers/supervisor.py).
    from workers.supervisor import WorkerSupervisor

    supervisor = WorkerSupervisor(worker_command(ranks=ranks), on_start=lambda pid: typer.echo(f"worker started (pid {pid})"))
    supervisor.start()
    typer.echo(f"API on http://{host or settings.host}:{port or settings.port}")
    try:
        _serve(host or settings.host, port or settings.port)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the worker's stop short (that left it running alone).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()


@cli.command()
def api(host: Optional[str] = typer.Option(None), port: Optional[int] = typer.Option(None)) -> None:
    """Run the API only (workers run elsewhere)."""
    from api.settings import get_settings

    _prepare_database()
    _serve(host or get_settings().host, port or get_settings().port)


@cli.command()
def worker(queues: str = typer.Option("gpu,cpu", help="Comma-separated Celery queues to consume."),
           name: str = typer.Option("beaver@%h", help="Worker name, for display (%h: the host); its identity adds "
                                    "host, pid and a random suffix, so two workers may share a name."),
           pool: Optional[str] = typer.Option(None, help="Celery pool (default BEAVER_WORKER_POOL)."),
           concurrency: int = typer.Option(1, help="Jobs at once (with a prefork pool)."),
           ranks: Optional[int] = typer.Option(None, min=1, help=RANKS_HELP),
           ray_ranks: Optional[int] = typer.Option(None, "--ray-ranks", min=1, help=RAY_RANKS_HELP)) -> None:
    """Run a Celery worker for training and analysis jobs."""
    from api.queue import default_ranks
    from api.settings import get_settings

    settings = get_settings()
    if ray_ranks is not None and not settings.ray_address:
        typer.echo("error: --ray-ranks needs BEAVER_RAY_ADDRESS (the Ray cluster's head, host:port)", err=True)
        raise typer.Exit(2)
    _prepare_database()
    _check_broker()
    ranks = ranks or default_ranks()
    os.environ["BEAVER_WORKER_RANKS"] = str(ranks)  # read by workers.ray_ranks: larger jobs go to Ray
    largest = ranks
    if settings.ray_address and any(q.strip() not in ("", "cpu") for q in queues.split(",")):  # training queues
        if ray_ranks is None:
            from workers.ray_ranks import cluster_total

            try:
                ray_ranks = cluster_total(settings.ray_address, settings.ray_rank_resource)
            except Exception as e:  # noqa: BLE001 — ray's connection errors have many types
                typer.echo(f"error: cannot reach the Ray cluster at {settings.ray_address}: {e}", err=True)
                raise typer.Exit(1) from None
        largest = max(ranks, ray_ranks)
        if largest > ranks:
                typer.echo(f"jobs of up to {ranks} ranks run here, of {ranks + 1} to {largest} on the Ray cluster at "
                       f"{settings.ray_address}", err=True)
    os.execv(sys.executable, worker_command(queues, name, pool, concurrency, largest))


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations (alembic upgrade head)."""
    from api.settings import get_settings, mask_url

    _prepare_database()
    typer.echo(f"database {mask_url(get_settings().resolved_database_url)} is at the latest revision")


def _key_database() -> None:
    """Migrate and say (on stderr) which database the key commands use: a BEAVER_HOME or
    BEAVER_DATABASE_URL other than the one meant would otherwise open another, empty database."""
    from api.settings import get_settings, mask_url

    _prepare_database()
    typer.echo(f"database: {mask_url(get_settings().resolved_database_url)}", err=True)


def _demo_hint() -> str | None:
    """Where the demo's keys are, when a demo platform exists beside this (empty) database."""
    from api.settings import get_settings

    settings = get_settings()
    demo = (settings.home / "demo" / "platform").resolve()
    if not (demo / "beaver.db").is_file() or settings.resolved_database_url == f"sqlite:///{demo / 'beaver.db'}":
        return None
    shown = os.path.relpath(demo) if demo.is_relative_to(Path.cwd()) else str(demo)
    return (f"this database has no API keys. The demo (make demo / beaver demo) runs a platform of its own in "
            f"{shown}; its keys: BEAVER_HOME={shown} beaver keys list")


@keys_cli.command("create")
def keys_create(name: str = typer.Option(..., help="Who or what the key is for."),
                role: str = typer.Option(..., help="admin | trainer | annotator | viewer")) -> None:
    """Create an API key and print it (the only time it is shown)."""
    from sqlmodel import Session

    from api.db import get_engine
    from api.deps import create_key
    from api.errors import ApiError

    _key_database()
    with Session(get_engine()) as session:
        try:
            row, key = create_key(session, name, role)
        except ApiError as e:
            _fail(e.message)
    typer.echo(f"{row.id}\t{row.role}\t{key}")


@keys_cli.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (key-…) or its prefix shown by `keys list`.")) -> None:
    """Revoke an API key (not the last admin key: nobody could create keys any more)."""
    from api.db import get_engine
    from api.deps import revoke_key
    from api.errors import ApiError

    _key_database()
    try:
        row = revoke_key(get_engine(), key_id, by_prefix=True)
    except ApiError as e:  # the API's rule, in the API's words: 404, or 409 for the last admin key
        _fail(e.message)
    typer.echo(f"revoked {row.id}")


@keys_cli.command("list")
def keys_list() -> None:
    """List API keys (never the keys themselves)."""
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.tables import ApiKey

    _key_database()
    with Session(get_engine()) as session:
        rows = list(session.exec(select(ApiKey).order_by(ApiKey.id)))
    for row in rows:
        typer.echo(f"{row.id}\t{row.name}\t{row.role}\t{row.prefix}…\t{'revoked' if row.revoked_at else 'active'}")
    if not rows:
        typer.echo(_demo_hint() or "this database has no API keys yet: `beaver up` creates the first admin key, "
                   "or `beaver keys create --name N --role admin`", err=True)


@cli.command("serve-vllm")
def serve_vllm(model: str = typer.Argument(..., help="Model id, model name or round name (→ its policy)."),
               port: int = typer.Option(8001), host: str = typer.Option("127.0.0.1"),
               python: Optional[str] = typer.Option(None, help="Python with vLLM (default BEAVER_VLLM_PYTHON)."),
               dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 "
                                                   "(default BEAVER_SERVING_DTYPE).")) -> None:
    """Start a vLLM OpenAI-compatible server for a registered model (pooling runner for reward/cost
    models); point BEAVER_VLLM_URLS at it to route that model there."""
    from sqlmodel import Session

    from api.db import get_engine
    from api.errors import ApiError
    from api.serving import vllm_command_for
    from api.settings import get_settings
    from models.vllm_engine import vllm_missing

    if dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        _fail(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    python = python or get_settings().vllm_python or sys.executable
    if (problem := vllm_missing(python)) is not None:  # before anything starts: say which Python, and the fix
        _fail(problem)
    _prepare_database()
    with Session(get_engine()) as session:
        try:
            cmd = vllm_command_for(session, model, port, python=python, host=host, dtype=dtype)
        except ApiError as e:
            _fail(e.message)
    typer.echo(" ".join(cmd))
    os.execvpe(cmd[0], cmd, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})




@cli.command()
def demo(url: Optional[str] = typer.Option(None, help="A running Beaver to drive (default: start an embedded one)."),
         key: Optional[str] = typer.Option(None, envvar="BEAVER_API_KEY", help="Admin or trainer key for --url."),
         seeds: str = typer.Option("0", help="Comma-separated seeds, run one after another (same seed, same table)."),
         split: str = typer.Option("report", help="Evaluate on the world's report prompts, or on tune ones while "
                                                  "choosing settings."),
         fast: bool = typer.Option(False, "--fast", help="One short round, no baselines (a smoke test)."),
         successors: bool = typer.Option(False, "--successors", help="Also run GRPO-Lag, GRPO, per-prompt PPO-Lag "
                                         "and a two-constraint PPO-Lag after round 1, each against PPO-Lag."),
         rounds: Optional[int] = typer.Option(None, min=1, max=10, help="Safe RLHF rounds (default 3; the "
                                              "successors need round 1 only)."),
         baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Run the PPO baselines."),
         exit_: bool = typer.Option(False, "--exit", help="Stop after printing the table."),
         port: Optional[int] = typer.Option(None, help="Port of the embedded API (default BEAVER_PORT).")) -> None:
    """Three Safe RLHF rounds on the synthetic world, through the REST API; writes $BEAVER_HOME/demo."""
    import json
    import shutil

    from api.demo import (Client, DemoConfig, EmbeddedPlatform, markdown_table, plot_seeds, plot_successors,
                          plot_survivors, run_demo, successors_markdown, successors_summary, summarize, summary_markdown,
                          survivors_markdown)
    from api.settings import get_settings

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        chosen = dict(eval_split=split, successors=successors) | ({"rounds": rounds} if rounds else {}) | (
            {} if baselines else {"baselines": False})
        configs = [DemoConfig.fast(seed=s, **chosen) if fast else DemoConfig(seed=s, **chosen) for s in seed_list]
    except ValueError as e:
        _fail(f"--seeds {seeds!r} / --split {split!r}: {e}")
    if not configs or len(set(seed_list)) != len(seed_list):
        _fail(f"--seeds {seeds!r}: give one or more distinct integers, e.g. 0,1,2")
    if url is not None and len(configs) > 1:
        _fail("several --seeds need the embedded platform (each seed starts a fresh one; their rounds share names)")
    if url is not None and not key:
        _fail("--url needs --key (or BEAVER_API_KEY)")
    settings = get_settings()
    out_dir = settings.home.resolve() / "demo"
    port = port or settings.port
    _exit_on_sigterm()
    shutil.rmtree(out_dir, ignore_errors=True)
    runs, platform = [], None
    try:
        for config in configs:
            started = time.perf_counter()
            if url is None:
                # A fresh embedded platform for each seed, so every run starts from the same state.
                if platform is not None:
                    platform.stop()
                shutil.rmtree(out_dir / "platform", ignore_errors=True)
                os.environ["BEAVER_HOME"] = str(out_dir / "platform")
                for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL", "BEAVER_RESULT_BACKEND",
                             "BEAVER_ARTIFACTS_DIR"):
                    os.environ.pop(name, None)
                clear_caches()
                platform = EmbeddedPlatform(out_dir / "platform", port)
                key = platform.start()
                typer.echo(f"seed {config.seed}: a fresh platform at http://127.0.0.1:{port} "
                           f"({out_dir / 'platform'}), admin key {key}")
            results = run_demo(Client(url or f"http://127.0.0.1:{port}", key), config, out_dir / f"seed-{config.seed}")
            runs.append(results)
            typer.echo(f"\nseed {config.seed} ({results['seconds']:.0f} s; {time.perf_counter() - started:.0f} s with the "
                       "platform's start):")
            if fast:
                typer.echo("SMOKE RUN (--fast): one short round, no baselines — these numbers say nothing about "
                           "Safe RLHF.")
            typer.echo(markdown_table(results))
        summary = summarize(runs)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "summary.md").write_text(summary_markdown(summary) + "\n")
        plot_seeds(summary, out_dir / "seeds.png")
        # What the last round still answers harmfully, and what λ and the constraint did (the diagnosis).
        traces = [json.loads((out_dir / f"seed-{run['seed']}" / "ppo_traces.json").read_text()) for run in runs]
        plot_survivors(runs, traces, out_dir / "survivors.png")
        (out_dir / "survivors.md").write_text(survivors_markdown(runs) + "\n")
        if len(runs) > 1:
            typer.echo("\n" + summary_markdown(summary))
        if successors:
            versus = successors_summary(runs)
            (out_dir / "successors.json").write_text(json.dumps(versus, indent=2))
            (out_dir / "successors.md").write_text(successors_markdown(versus) + "\n")
            plot_successors(versus, out_dir / "successors.png")
            typer.echo(f"\nSuccessors of PPO-Lag, median [min – max] over seeds {', '.join(map(str, seed_list))}; "
                       "Δ: the method minus ppo_lag on the same seed:\n\n" + successors_markdown(versus))
        typer.echo(f"\nresults: {out_dir}/seed-*/results.json, {out_dir}/summary.md · plots: {out_dir}/**/*.png")
        if not exit_ and platform is not None:
            typer.echo(f"\nBeaver is running at http://127.0.0.1:{port} with seed {configs[-1].seed}'s rounds "
                       f"(admin key {key}).")
            typer.echo(f"Chat with a round: POST http://127.0.0.1:{port}/v1/chat/completions with model "
                       f"\"beaver-v{configs[-1].rounds}\"; arena: http://127.0.0.1:{port}/ — Ctrl-C stops it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        if platform is not None:
            platform.stop()


# --- remote commands: a Beaver anywhere, through its REST API (api/client.py) -----------------------------

# No envvar= here: the client reads BEAVER_URL / BEAVER_API_KEY itself, after both levels' options (an
# envvar at the group level would override the root's --url).
URL_OPTION = typer.Option(None, "--url", help="The Beaver API (default: BEAVER_URL, else http://127.0.0.1:8000).")
KEY_OPTION = typer.Option(None, "--key", help="An API key (default: BEAVER_API_KEY).")
JSON_OPTION = typer.Option(False, "--json", help="The API's objects as JSON, for scripts.")
_remote: dict[str, str | None] = {"url": None, "key": None}


@cli.callback()
def _root(url: Optional[str] = URL_OPTION, key: Optional[str] = KEY_OPTION) -> None:
    """Beaver: a self-hosted Safe RLHF platform."""
    _remote.update(url=url or _remote["url"], key=key or _remote["key"])


def _group_options(url: Optional[str] = URL_OPTION, key: Optional[str] = KEY_OPTION) -> None:
    # `beaver --url U jobs list` and `beaver jobs --url U list` alike; the one nearer the command wins.
    _remote.update(url=url or _remote["url"], key=key or _remote["key"])


for _group in (datasets_cli, models_cli, rounds_cli):
    _group.callback()(_group_options)


@jobs_cli.callback()
def _jobs(ctx: typer.Context, url: Optional[str] = URL_OPTION, key: Optional[str] = KEY_OPTION) -> None:
    _group_options(url, key)
    if ctx.invoked_subcommand is None:
        jobs_params()


@jobs_cli.command("params")
def jobs_params() -> None:
    """Every job type and its params (the reference the README holds), as Markdown."""
    from models.jobs import params_markdown

    typer.echo(params_markdown(), nl=False)


def remote(command):
    """A remote command: its ``BeaverError`` becomes one line on stderr and exit code 3 (4: unreachable)."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        from api.client import BeaverError

        try:
            return command(*args, **kwargs)
        except BeaverError as e:
            where = f" (param {e.param})" if e.param else ""
            status = f"{e.status} " if e.status else ""
            typer.secho(f"error: {status}{e.code}: {e.message}{where}", fg=typer.colors.RED, err=True)
            raise typer.Exit(3 if e.status else 4) from None

    return run


def _client():
    from api.client import Client

    return Client(_remote["url"], _remote["key"])


def _print_json(value) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _table(rows: list[list], header: list[str]) -> None:
    """Rows as aligned columns (tab-separated would not line up in a terminal)."""
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _when(seconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


def _print_dataset(dataset: dict, kind: str, json_: bool) -> None:
    """A stored dataset: its object (--json), or its id on stdout and a line about it on stderr."""
    if json_:
        return _print_json(dataset)
    typer.echo(f"{dataset['name']}: {dataset.get('num_records')} {kind} records", err=True)
    typer.echo(dataset["id"])


def _column_map(column: list[str]) -> dict[str, str] | None:
    column_map = dict(item.split("=", 1) for item in column if "=" in item)
    if len(column_map) != len(column):
        raise typer.BadParameter("give FILE_COLUMN=FIELD", param_hint="--column")
    return column_map or None


@datasets_cli.command("upload")
@remote
def datasets_upload(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL (one record a line), "
                                                 "Parquet, or a tar/zip of a `datasets` save_to_disk folder."),
                    kind: str = typer.Option(..., help="preference | prompt | sft | samples"),
                    name: Optional[str] = typer.Option(None, help="Default: the file's name without its extension."),
                    column: list[str] = typer.Option([], help="Rename a file column to a record field: "
                                                     "FILE_COLUMN=FIELD (e.g. question=prompt). Repeatable."),
                    json_: bool = JSON_OPTION) -> None:
    """Upload a dataset; prints its id (validated whole: a bad record is an error naming its line)."""
    dataset = _client().upload_dataset(file, kind, name, _column_map(column))
    _print_dataset(dataset, kind, json_)


@datasets_cli.command("list")
@remote
def datasets_list(limit: int = typer.Option(100, min=1, help="At most this many, newest first."),
                  json_: bool = JSON_OPTION) -> None:
    """Datasets, newest first."""
    data = _client().list_datasets(limit)
    if json_:
        return _print_json(data)
    _table([[d["id"], d["kind"], d.get("num_records"), d["name"], _when(d.get("created_at"))] for d in data],
           ["ID", "KIND", "RECORDS", "NAME", "CREATED"])


@datasets_cli.command("import")
@remote
def datasets_import(hub_id: str = typer.Argument(..., help="A Hugging Face dataset id (PKU-Alignment/PKU-SafeRLHF), "
                                                 "or a local folder: save_to_disk's, or of Parquet/JSON files."),
                    split: str = typer.Option(..., help="The split to import (train, test, …)."),
                    kind: str = typer.Option(..., help="preference | prompt | sft | samples"),
                    name: Optional[str] = typer.Option(None, help="Default: HUB_ID:SPLIT."),
                    config: Optional[str] = typer.Option(None, help="The dataset's configuration (subset), if it has "
                                                         "several."),
                    column: list[str] = typer.Option([], help="Rename a dataset column to a record field: "
                                                     "COLUMN=FIELD (e.g. question=prompt). Repeatable."),
                    json_: bool = JSON_OPTION) -> None:
    """Import a Hugging Face dataset: loaded here (the local cache; the hub unless HF_HUB_OFFLINE=1), uploaded
    as Parquet, validated whole by the server. Needs `pip install 'beaver[hf]'`; prints the dataset's id."""
    from api.hub import HubImportError

    try:
        dataset = _client().import_hub_dataset(hub_id, split, kind, name, _column_map(column), config)
    except HubImportError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    _print_dataset(dataset, kind, json_)


@datasets_cli.command("export")
@remote
def datasets_export(dataset_id: str = typer.Argument(..., help="The dataset's id."),
                    file: Path = typer.Argument(..., dir_okay=False, help="Where to write it."),
                    format_: str = typer.Option("jsonl", "--format", help="jsonl | parquet")) -> None:
    """Download a dataset's records as JSONL or Parquet (what `datasets.load_dataset` reads)."""
    if format_ not in ("jsonl", "parquet"):
        raise typer.BadParameter("jsonl or parquet", param_hint="--format")
    typer.echo(str(_client().download_dataset(dataset_id, file, format_)))


def _read_params(path: Path | None, overrides: list[str]) -> dict:
    """Job params from a YAML or JSON file, then ``--set a.b=value`` overrides (values read as YAML)."""
    from api.client import load_params, yaml_load

    try:
        params = load_params(path) if path is not None else {}
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--params") from None
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted:
            raise typer.BadParameter(f"{item!r}: give name=value (nested: optim.lr=1e-5)", param_hint="--set")
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise typer.BadParameter(f"{dotted}: {part} is not an object", param_hint="--set")
        try:
            node[leaf] = yaml_load(value)
        except ValueError:
            node[leaf] = value
    return params


@jobs_cli.command("submit")
@remote
def jobs_submit(job_type: str = typer.Argument(..., metavar="TYPE", help="sft, reward, cost, ppo_lag, … "
                                               "(`beaver jobs params` lists them)."),
                params: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                      help="The job's params: a YAML or JSON file."),
                set_: list[str] = typer.Option([], "--set", help="Override one param: name=value (nested: "
                                               "optim.lr=1e-5; the value is read as YAML). Repeatable."),
                dataset: list[str] = typer.Option([], help="A dataset id the job reads. Repeatable."),
                world_size: int = typer.Option(1, min=1, help="Ranks (GPUs) the job runs on."),
                follow: bool = typer.Option(False, "--follow", help="Then follow it as `beaver jobs follow` does."),
                json_: bool = JSON_OPTION) -> None:
    """Submit a job; prints its id. The server checks the params first: a bad one is exit 3 naming it."""
    job = _client().submit(job_type, _read_params(params, set_), dataset, world_size)
    if json_:
        _print_json(job)
    else:
        typer.echo(job["id"])
    if follow:
        jobs_follow(job["id"])


@jobs_cli.command("list")
@remote
def jobs_list(status: Optional[str] = typer.Option(None, help="queued | running | succeeded | failed | cancelled"),
              job_type: Optional[str] = typer.Option(None, "--type", help="Only jobs of this type."),
              limit: int = typer.Option(20, min=1, help="At most this many, newest first."),
              json_: bool = JSON_OPTION) -> None:
    """Jobs, newest first."""
    data = _client().list_jobs(status, job_type, limit)
    if json_:
        return _print_json(data)
    rows = []
    for j in data:
        progress = j.get("progress") or {}
        percent = progress.get("percent")
        rows.append([j["id"], j["type"], j["status"], "" if percent is None else f"{percent:.0f}%",
                     _when(j.get("created_at")), (j.get("error") or {}).get("code", "")])
    _table(rows, ["ID", "TYPE", "STATUS", "PROGRESS", "CREATED", "ERROR"])


@jobs_cli.command("get")
@remote
def jobs_get(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """One job, as JSON."""
    _print_json(_client().get_job(job_id))


# Metrics shown live beside the bar, as short names: the Safe RLHF ones first.
LIVE_METRICS = (("train/reward", "reward"), ("train/episode_cost", "cost"), ("lagrange/lambda", "λ"),
                ("train/kl", "kl"), ("train/loss", "loss"), ("eval/accuracy", "acc"), ("eval/loss", "eval_loss"))


@jobs_cli.command("follow")
@remote
def jobs_follow(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Follow a job to its end: a progress bar with its live metrics (reward, cost, λ, …) and its
    messages. Exits 0 when it succeeded, 1 when it failed or was cancelled (its error code printed)."""
    from tqdm import tqdm

    client = _client()
    bar = tqdm(total=None, unit="step", desc=job_id, dynamic_ncols=True)
    try:
        for event in client.follow(job_id):
            data = event.get("data") or {}
            if "step" in data and "total_steps" in data:
                bar.total, bar.n = data["total_steps"], data["step"]
                shown = {short: f"{data[name]:.3g}" for name, short in LIVE_METRICS
                         if isinstance(data.get(name), (int, float))}
                bar.set_postfix(shown, refresh=False)
                bar.refresh()
            elif event.get("message"):
                bar.write(f"{event['level']}: {event['message']}" if event.get("level") == "error"
                          else event["message"], file=sys.stderr)
    finally:
        bar.close()
    job = client.get_job(job_id)
    if job["status"] == "succeeded":
        models = ", ".join(job.get("result_models") or []) or "none"
        typer.echo(f"{job_id} succeeded; models: {models}")
        return
    error = job.get("error") or {}
    typer.secho(f"{job_id} {job['status']}" + (f": {error.get('code')}: {error.get('message')}" if error else ""),
                fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@jobs_cli.command("cancel")
@remote
def jobs_cancel(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a job: a queued one at once, a running one within seconds."""
    job = _client().cancel(job_id)
    typer.echo(f"{job['id']} {job['status']}" + (" (stops within seconds)" if job["status"] == "running" else ""))


@models_cli.command("list")
@remote
def models_list(kind: Optional[str] = typer.Option(None, help="policy | reward | cost | round"),
                json_: bool = JSON_OPTION) -> None:
    """Rounds and registered models."""
    data = _client().list_models(kind)
    if json_:
        return _print_json(data)
    _table([[m["id"], m["kind"], m["name"], m.get("job_id") or ""] for m in data], ["ID", "KIND", "NAME", "JOB"])


@models_cli.command("pull")
@remote
def models_pull(ref: str = typer.Argument(..., metavar="ID", help="A model id or name, a round name (its policy), "
                                          "or a job id (the model it made)."),
                directory: Path = typer.Argument(..., metavar="DIR", help="Where to unpack it (created).")) -> None:
    """Download a model and unpack it into DIR: a Hugging Face folder that from_pretrained and vLLM load."""
    client = _client()
    if ref.startswith("job-"):
        made = client.get_job(ref).get("result_models") or []
        if not made:
            typer.secho(f"error: job {ref} made no model", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        ref = made[0]
    client.pull_model(ref, directory)
    typer.echo(f"{ref} → {directory}")


@rounds_cli.command("list")
@remote
def rounds_list(json_: bool = JSON_OPTION) -> None:
    """Safe RLHF rounds, newest first: the policy, and the reward and cost models that shaped it."""
    data = _client().list_rounds()
    if json_:
        return _print_json(data)
    _table([[r["name"], r["id"], r["policy_model_id"], r.get("reward_model_id"), r.get("cost_model_id"),
             _when(r.get("created_at"))] for r in data], ["NAME", "ID", "POLICY", "REWARD", "COST", "CREATED"])


def clear_caches() -> None:
    """Forget cached settings, engine and Celery client (after changing BEAVER_* variables)."""
    from api.db import get_engine
    from api.queue import celery_client
    from api.settings import get_settings

    get_settings.cache_clear()
    get_engine.cache_clear()
    celery_client.cache_clear()


def main() -> None:
    from api.settings import SettingsInvalid

    try:
        cli()
    except SettingsInvalid as e:  # e.g. a BEAVER_ENDPOINTS an admin mistyped: one line, no secret in it
        typer.secho(f"error: bad setting: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
