"""`python -m bench` (or `make bench ARGS="…"`): run the benchmarks against a running API.

    python -m bench                                  # everything, against make dev on :4000
    python -m bench --quick                          # small counts, a smoke run
    python -m bench --scenarios get,list,authority   # some scenarios (names or numbers 1-13)
    python -m bench --base-url http://127.0.0.1:4100 --data-dir /tmp/bench-data \\
        --database-url postgresql://postgres@127.0.0.1:55001/coordinator --temporal-address 127.0.0.1:7300 \\
        --zone-capacity 100000 --app-capacity 100000

The server should run with its rate limiter off and raised capacity limits:
    COORDINATOR_RATE_LIMIT_PER_MIN=0 MAX_AGENTS_PER_ZONE=100000 MAX_AGENTS_PER_APP=100000 MAX_CHILDREN=2000 make dev
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIO_KEYS = ["create", "get", "list", "delegate", "authority", "impact", "suspend", "expiry", "heartbeat", "rss",
                 "follow", "follow_curve", "feed_latency", "bulk_revoke"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark a running Coordinator API.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: " + ", ".join(f"{i + 1}={k}" for i, k in enumerate(SCENARIO_KEYS)))
    p.add_argument("--base-url", default="http://127.0.0.1:4000", help="API base URL (default %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("DEV_DATA_DIR") or str(REPO_ROOT / ".data"),
                   help="make dev's data dir, for the default token and keys (default $DEV_DATA_DIR or .data)")
    p.add_argument("--operator-token", default=None,
                   help="operator token (default: $CARACAL_COORDINATOR_TOKEN, else <data-dir>/operator-token)")
    p.add_argument("--key-dir", default=None, help="signing key that the server trusts, used to mint mandates for "
                   "the benchmark zones (default <data-dir>/keys)")
    p.add_argument("--issuer", default=os.environ.get("ISSUER_URL") or "http://127.0.0.1:4000/sts",
                   help="iss/aud of minted mandates: the server's ISSUER_URL (default $ISSUER_URL or %(default)s)")
    p.add_argument("--scope", default=os.environ.get("AGENT_COORDINATOR_SCOPE") or "agent:lifecycle")
    p.add_argument("--scenarios", default="", help="comma list of scenario names or numbers (default: all)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run of every scenario")
    p.add_argument("--out", default=None, help="JSON file or directory (default bench/results/<date>-<commit>.json)")
    p.add_argument("--database-url", default=None, help="Postgres of the stack: seeds the 10,000-edge graph "
                   "(scenario impact) and counts suspended rows directly (scenario suspend)")
    p.add_argument("--temporal-address", default=None, help="Temporal frontend of the stack: counts suspended "
                   "workflows through visibility (scenario suspend)")
    p.add_argument("--temporal-namespace", default="default")
    p.add_argument("--zone-capacity", type=int, default=50, help="live sessions per zone the server allows "
                   "(its MAX_AGENTS_PER_ZONE; default %(default)s): bulk sessions are spread over zones of this size")
    p.add_argument("--app-capacity", type=int, default=200, help="live sessions per application the server "
                   "allows (its MAX_AGENTS_PER_APP; default %(default)s)")
    p.add_argument("--setup-concurrency", type=int, default=16, help="concurrency of set-up traffic")
    sized = p.add_argument_group("scenario sizes (defaults: full mode / --quick)")
    sized.add_argument("--expiry-live", type=int, help="live task sessions during the expiry scenario (10000 / 50)")
    sized.add_argument("--expiry-probes", type=int, help="sessions whose expiry is measured (200 / 10)")
    sized.add_argument("--heartbeat-sessions", type=int, help="heartbeating service sessions (1000 / 20)")
    sized.add_argument("--heartbeat-interval", type=float, help="seconds between heartbeats (5 / 5)")
    sized.add_argument("--heartbeat-duration", type=float, help="seconds of heartbeating (300 / 15)")
    sized.add_argument("--tree-size", type=int, help="sessions in the suspended tree (1000 / 40)")
    sized.add_argument("--tree-fanout", type=int, help="children per parent in that tree (10 / 10)")
    sized.add_argument("--impact-edges", type=int, help="edges of the impact graph (10000 / 300)")
    sized.add_argument("--impact-sessions", type=int, help="sessions of the impact graph (2000 / 60)")
    sized.add_argument("--follow-curve-rates", help="offered create rates of follow_curve (50,100,200,400 / 10)")
    sized.add_argument("--follow-curve-mix-rates", help="offered rates of its mixed load (150 / 20; empty: none)")
    sized.add_argument("--follow-curve-seconds", type=float, help="seconds of each load (60 / 3)")
    sized.add_argument("--feed-latency-commands", type=int, help="commands whose event is timed on the feed (500 / 20)")
    p.add_argument("--note", action="append", default=[], help="free text stored in the JSON notes (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _rates(text: str | None) -> list[int] | None:
    return None if text is None else [int(r) for r in text.split(",") if r.strip()]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    data_dir = Path(args.data_dir)
    token = args.operator_token or os.environ.get("CARACAL_COORDINATOR_TOKEN", "")
    if not token:
        path = data_dir / "operator-token"
        if not path.exists():
            print(f"no operator token: pass --operator-token or run make dev (which writes {path})", file=sys.stderr)
            return 2
        token = path.read_text().strip()
    key_dir = Path(args.key_dir) if args.key_dir else data_dir / "keys"
    if not (key_dir / "signing-key.pem").exists():
        print(f"no signing key in {key_dir}: pass --key-dir of the running stack (make dev writes .data/keys)",
              file=sys.stderr)
        return 2

    from bench.core import Config
    from bench.runner import run_bench
    from devstack.keys import ensure_signing_key

    cfg = Config(
        base_url=args.base_url.rstrip("/"), operator_token=token, signing_key=ensure_signing_key(key_dir),
        issuer=args.issuer, scope=args.scope, quick=args.quick,
        scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()], out=args.out,
        database_url=args.database_url, temporal_address=args.temporal_address,
        temporal_namespace=args.temporal_namespace, zone_capacity=args.zone_capacity,
        app_capacity=args.app_capacity, setup_concurrency=args.setup_concurrency,
        expiry_live=args.expiry_live, expiry_probes=args.expiry_probes,
        heartbeat_sessions=args.heartbeat_sessions, heartbeat_interval=args.heartbeat_interval,
        heartbeat_duration=args.heartbeat_duration, tree_size=args.tree_size, tree_fanout=args.tree_fanout,
        impact_edges=args.impact_edges, impact_sessions=args.impact_sessions,
        follow_curve_rates=_rates(args.follow_curve_rates), follow_curve_mix_rates=_rates(args.follow_curve_mix_rates),
        follow_curve_seconds=args.follow_curve_seconds, feed_latency_commands=args.feed_latency_commands,
        notes=args.note, verbose=not args.quiet)
    document = asyncio.run(run_bench(cfg))
    failed = [s["name"] for s in document["scenarios"] if s["status"] == "failed"]
    if failed:
        print(f"failed scenarios: {', '.join(failed)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: temporalio's runtime can abort at interpreter exit (sdk-python#300).
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
