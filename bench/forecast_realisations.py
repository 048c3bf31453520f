"""Is the forecast bar's verdict on ServeGen's peaks stable across sampled realisations?

ServeGen gives rates, not arrivals, so ``warmserve forecast eval`` samples one realisation of its
arrival model per series (``warmserve.evaluation.traces.SEED``) and takes each window's peak from
it. This scores the planner's mixture, AutoETS (fitted at every window, as in the eval) and
last-value on the held-out part of other realisations, with the planner's settings unchanged, and
writes the mixture's ratios to both. The first run fits AutoETS about 20,000 times per realisation
(minutes on two cores; cached like the eval's).

    python bench/forecast_realisations.py [--seeds 0,100,200]
"""

from __future__ import annotations

import json
import os

import click

from warmserve.evaluation import batch, scoring, traces
from warmserve.policy.forecast import MixParams

OUT = "bench/results/forecast_realisations.json"


def ratios(seed: int) -> dict:
    """Held-out scores of the mixture, and its ratios to AutoETS and last-value, per model and
    over all series, of the realisation ``seed``."""
    traces.SEED = seed
    s = traces.load_servegen()
    preds = {
        "mixture": batch.mixture_pair(s.avg, s.peak, scoring.planner_params(s.period)),
        "autoets": scoring.autoets_all(s),
        "last-value": (batch.last_value(s.avg), batch.last_value(s.peak)),
    }
    out = {}
    for where, sc in scoring.held_out_scores(s, preds).items():
        out[where] = {
            "mixture": {m: sc["mixture"][m] for m in scoring.MEASURES},
            **{
                f"mixture / {b}": {
                    m: round(sc["mixture"][m] / sc[b][m], 4) for m in scoring.MEASURES
                }
                for b in ("autoets", "last-value")
            },
        }
    return out


@click.command()
@click.option("--seeds", default="0,100,200", show_default=True, help="Realisations (SEED).")
def main(seeds: str) -> None:
    chosen = [int(x) for x in seeds.split(",")]
    results = {str(seed): ratios(seed) for seed in chosen}
    for seed, r in results.items():
        click.echo(f"SEED {seed}: per model {r['models_only']['mixture / autoets']}")
    doc = {
        "command": "python bench/forecast_realisations.py"
        + (f" --seeds {seeds}" if seeds != "0,100,200" else ""),
        "planner_mix_params": {k: getattr(MixParams(), k) for k in ("eta", "discount", "tau")},
        "results": results,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
