"""Judge throughput against a loopback OpenAI-compatible server with a fixed capacity.

The server (``tests/servers/fake_judge.py``) serves at most ``--server-concurrency`` requests at a time, each
taking ``--service-ms``: its sustainable rate is concurrency / service time. The judge, configured with the
same concurrency, scores ``--answers`` answers on aligned and coherent (two calls each, all uncached, with
the sqlite cache on as in a real run). A second run puts the server into a 429 storm (the first
``--storm`` requests get ``429 Retry-After: --retry-after``): slower, but no verdict may be lost.

    python bench/bench_judge.py --answers 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.judge import JudgeClient, JudgeConfig, JudgeItem  # noqa: E402
from tests.servers.fake_judge import FakeJudge  # noqa: E402


def run(args: argparse.Namespace, storm: int) -> dict[str, float]:
    items = [
        JudgeItem(m, f"question {i}", f"answer {i}")
        for i in range(args.answers)
        for m in ("aligned", "coherent")
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeJudge(
            delay=args.service_ms / 1000,
            max_concurrency=args.server_concurrency,
            storm=(storm, args.retry_after),
        ) as server,
    ):
        config = JudgeConfig(
            model="fake-judge",
            base_url=server.base_url,
            concurrency=args.server_concurrency,
            backoff=0.05,
            cache_path=str(Path(tmp) / "cache.sqlite"),
        )
        client = JudgeClient(config)
        start = time.perf_counter()
        verdicts = client.score_many(items, desc="storm" if storm else "steady")
        wall = time.perf_counter() - start
        client.close()
    ok = sum(v.score is not None for v in verdicts)
    return {
        "calls": len(items),
        "verdicts": ok,
        "lost": len(items) - ok,
        "http": client.requests_made,
        "429": server.rate_limited,
        "wall": wall,
        "rate": len(items) / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=1000)
    p.add_argument("--service-ms", type=float, default=50.0, help="server time per request")
    p.add_argument("--server-concurrency", type=int, default=8, help="server capacity = judge concurrency")
    p.add_argument("--storm", type=int, default=160, help="requests answered 429 in the storm run")
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of each 429 (s)")
    args = p.parse_args()
    ceiling = args.server_concurrency / (args.service_ms / 1000)
    steady, storm = run(args, 0), run(args, args.storm)
    print(
        f"server: {args.server_concurrency} concurrent x {args.service_ms:g} ms -> "
        f"ceiling {ceiling:.1f} req/s; "
        f"judge concurrency {args.server_concurrency}; {args.answers} answers x 2 metrics"
    )
    print(
        "| run | judge calls | verdicts | lost | HTTP requests | 429s | wall s | calls/s | ceiling | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (
        ("steady", steady),
        (f"429 storm ({args.storm} x Retry-After {args.retry_after:g} s)", storm),
    ):
        print(
            f"| {name} | {r['calls']} | {r['verdicts']} | {r['lost']} | {r['http']} | {r['429']} "
            f"| {r['wall']:.2f} | "
            f"{r['rate']:.1f} | {ceiling:.1f} | {r['rate'] / ceiling:.3f} |"
        )
    ok = steady["rate"] >= 0.9 * ceiling and steady["lost"] == 0 and storm["lost"] == 0 and storm["429"] > 0
    print(f"target: >= 90 % of the ceiling, no verdict lost in either run: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
